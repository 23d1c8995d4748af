"""DCAL GLCA / PWCA against dense implementations written from the paper's equations."""

import random

import pytest
import torch
from torch.nn import functional as F

from foveal.nn.dcal import GlobalLocalCrossAttention, PairwiseCrossAttention, attention_rollout


def _maps(b, h, n, layers, heads_axis=True):
    shape = (b, h, n, n) if heads_axis else (b, n, n)
    return [torch.softmax(torch.randn(shape) * 3, -1) for _ in range(layers)]


def dense_rollout(maps):
    """DCAL eq. (3) as written: Ŝ_i = S̄_i ⊗ S̄_{i−1} ⊗ … ⊗ S̄_1, S̄ = 0.5 S + 0.5 E, full matrices."""
    n = maps[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    s_hat = eye.expand(maps[0].shape[0], n, n)
    for a in maps:
        a = a.double()
        s = a.mean(1) if a.dim() == 4 else a
        s_hat = (0.5 * s + 0.5 * eye) @ s_hat
    return s_hat


def _qkv(module, x):
    b, n, c = x.shape
    h = module.num_heads
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias).reshape(b, n, 3, h, c // h)
    return qkv.permute(2, 0, 3, 1, 4)  # (3, b, h, n, d)


def _attn(q, k, v, scale):
    return torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v


def glca_reference(module, x, s_hat, ratio, include_cls):
    """Top-R patches (by the CLS row of the rollout) as queries over all keys; other tokens unchanged."""
    b, n, c = x.shape
    r = max(1, int(round(ratio * (n - 1))))
    q, k, v = _qkv(module, x)
    out = x.clone()
    for i in range(b):
        order = sorted(range(1, n), key=lambda j: -s_hat[i, 0, j].item())[:r]
        rows = sorted(order + ([0] if include_cls else []))
        o = _attn(q[i][:, rows], k[i], v[i], module.head_dim**-0.5)  # (h, R', d)
        o = o.transpose(0, 1).reshape(len(rows), c)
        out[i, rows] = F.linear(o, module.proj.weight, module.proj.bias)
    return out


def _grads_close(out, want, tensors, atol=1e-4, rtol=1e-4):
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, tensors, g), torch.autograd.grad(want, tensors, g)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("seed", range(4))
def test_rollout_matches_matrix_product(seed):
    rng = random.Random(seed)
    b, h, n = rng.randint(1, 3), rng.randint(1, 4), rng.randint(2, 20)
    maps = _maps(b, h, n, rng.randint(1, 5), heads_axis=seed % 2 == 0)
    torch.testing.assert_close(attention_rollout(maps).double(), dense_rollout(maps)[:, 0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_glca_matches_dense_forward_and_backward(seed):
    rng = random.Random(seed + 100)
    b, heads, n = rng.randint(2, 3), rng.choice([1, 2, 4]), rng.randint(2, 40)
    dim = heads * rng.choice([4, 8])
    ratio, include_cls = rng.choice([0.1, 0.3, 0.5, 1.0]), seed % 2 == 0
    m = GlobalLocalCrossAttention(dim, heads, top_ratio=ratio, include_cls=include_cls)
    maps = _maps(b, rng.randint(1, 3), n, rng.randint(1, 4))
    x = torch.randn(b, n, dim, requires_grad=True)
    out, index = m(x, maps, return_index=True)
    want = glca_reference(m, x, dense_rollout(maps), ratio, include_cls)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert index.shape == (b, max(1, round(ratio * (n - 1))) + include_cls)
    _grads_close(out, want, [x] + list(m.parameters()))
    # a precomputed rollout, as scores or as the full matrix, selects the same tokens
    torch.testing.assert_close(m(x, rollout=dense_rollout(maps)[:, 0].float()), out)
    torch.testing.assert_close(m(x, rollout=dense_rollout(maps).float()), out)


def pwca_reference(module, x, x_pair):
    q, k1, v1 = _qkv(module, x)
    _, k2, v2 = _qkv(module, x_pair)
    o = _attn(q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), module.head_dim**-0.5)
    b, n, c = x.shape
    return F.linear(o.transpose(1, 2).reshape(b, n, c), module.proj.weight, module.proj.bias)


@pytest.mark.parametrize("seed", range(3))
def test_pwca_matches_dense_forward_and_backward(seed):
    rng = random.Random(seed + 200)
    b, heads, n, n2 = rng.randint(2, 3), rng.choice([1, 2, 4]), rng.randint(1, 20), rng.randint(1, 20)
    dim = heads * rng.choice([4, 8])
    m = PairwiseCrossAttention(dim, heads, qkv_bias=seed != 1)
    x = torch.randn(b, n, dim, requires_grad=True)
    x_pair = torch.randn(b, n2, dim, requires_grad=True)
    out, want = m(x, x_pair), pwca_reference(m, x, x_pair)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    _grads_close(out, want, [x, x_pair] + list(m.parameters()))
    # eval: plain self-attention, the pair ignored
    m.eval()
    q, k, v = _qkv(m, x)
    sa = F.linear(_attn(q, k, v, m.head_dim**-0.5).transpose(1, 2).reshape(b, n, dim), m.proj.weight, m.proj.bias)
    torch.testing.assert_close(m(x, x_pair), sa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x), sa, atol=1e-5, rtol=1e-5)


def test_bfloat16_loosely_matches_float32():
    torch.manual_seed(1)
    b, n, dim = 2, 17, 16
    maps = _maps(b, 2, n, 2)
    s_hat = dense_rollout(maps)
    for cls, ref in ((GlobalLocalCrossAttention, None), (PairwiseCrossAttention, pwca_reference)):
        mb = cls(dim, 2).to(torch.bfloat16)
        m = cls(dim, 2)
        m.load_state_dict(mb.state_dict())
        xb = torch.randn(b, n, dim, dtype=torch.bfloat16, requires_grad=True)
        pb = torch.randn(b, 5, dim, dtype=torch.bfloat16, requires_grad=True)
        xf, pf = (t.detach().float().requires_grad_() for t in (xb, pb))
        if ref is None:
            out, want = mb(xb, rollout=s_hat[:, 0].float()), glca_reference(m, xf, s_hat, 0.1, True)
        else:
            out, want = mb(xb, pb), ref(m, xf, pf)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want, atol=0.05, rtol=0.05)
        g = torch.randn(out.shape)
        (out.float() * g).sum().backward()
        (want * g).sum().backward()
        torch.testing.assert_close(xb.grad.float(), xf.grad, atol=0.05, rtol=0.05)


def test_pattern_and_torch_compile_eager_smoke():
    m = GlobalLocalCrossAttention(8, 2, top_ratio=0.3)
    assert (m.pattern(11).n_q, m.pattern(11).n_kv) == (4, 11)
    p = PairwiseCrossAttention(8, 2)
    assert (p.pattern(5, 7).n_q, p.pattern(5, 7).n_kv) == (5, 12)
    x, maps = torch.randn(2, 11, 8), _maps(2, 2, 11, 2)
    torch.testing.assert_close(torch.compile(m, backend="eager")(x, maps), m(x, maps))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="dim must be divisible by num_heads, got 10 and 4"):
        GlobalLocalCrossAttention(10, 4)
    with pytest.raises(ValueError, match=r"top_ratio must be a number in \(0, 1\], got 0"):
        GlobalLocalCrossAttention(8, 2, top_ratio=0)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of .* got 'fast'"):
        PairwiseCrossAttention(8, 2, backend="fast")
    m = GlobalLocalCrossAttention(8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="give exactly one of attn_maps"):
        m(x)
    with pytest.raises(ValueError, match=r"attn_maps are \(2, 2, 6, 6\) but x has batch 2 and 5 tokens"):
        m(x, _maps(2, 2, 6, 1))
    with pytest.raises(ValueError, match=r"rollout must have shape \(2, 5\) or \(2, 5, 5\), got \(2, 4\)"):
        m(x, rollout=torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, tokens, dim\), got \(5, 8\)"):
        m(x[0], rollout=torch.rand(5))
    p = PairwiseCrossAttention(8, 2)
    with pytest.raises(ValueError, match="x_pair has 4 channels but dim is 8"):
        p(x, torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"x_pair must have the batch size of x \(2\), got 3"):
        p(x, torch.randn(3, 5, 8))
