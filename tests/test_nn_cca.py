"""CoreContextAttention against a dense implementation written from the paper's definition."""

import math
import random

import pytest
import torch

from foveal.nn.cca import CoreContextAttention


pytestmark = pytest.mark.usefixtures("one_thread")


def visible(t, n, g, s):
    """Core groups and raw keys query t sees (CCA: ℓ(t) = ((t+1) mod g) + s; c ≤ floor((t − (g−1) − s)/g))."""
    ell = (t + 1) % g + s
    raw = [j for j in range(n) if t - ell < j <= t]
    cores = [c for c in range(n // g) if c <= math.floor((t - (g - 1) - s) / g)]
    return cores, raw


def cca_reference(m, x):
    """Dense CCA: qkv, core tokens by per-group softmax pooling, per-query joint softmax, proj (float32)."""
    b, n, c = x.shape
    h, g, s = m.num_heads, m.group_size, m.window_size
    x = x.float()
    qkv = torch.nn.functional.linear(x, m.qkv.weight.float(), None if m.qkv.bias is None else m.qkv.bias.float())
    q, k, v = qkv.reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    core_k, core_v = [], []
    for grp in range(n // g):
        ks, vs = k[:, :, grp * g : (grp + 1) * g], v[:, :, grp * g : (grp + 1) * g]
        w = torch.softmax((ks @ q[:, :, grp * g + g - 1, :, None]).squeeze(-1) * m.scale, -1)  # (B, H, g)
        core_k.append((w[..., None] * ks).sum(2))
        core_v.append((w[..., None] * vs).sum(2))
    outs = []
    for t in range(n):
        cores, raw = visible(t, n, g, s)
        kk = torch.stack([core_k[i] for i in cores] + [k[:, :, j] for j in raw], 2)
        vv = torch.stack([core_v[i] for i in cores] + [v[:, :, j] for j in raw], 2)
        p = torch.softmax((kk @ q[:, :, t, :, None]).squeeze(-1) * m.scale, -1)
        outs.append((p[..., None] * vv).sum(2))
    out = torch.stack(outs, 2).transpose(1, 2).reshape(b, n, c)
    return torch.nn.functional.linear(out, m.proj.weight.float(), m.proj.bias.float())


@pytest.mark.parametrize("seed", range(3))
def test_forward_and_backward_match_the_dense_definition(seed):
    rng = random.Random(seed)
    g = rng.randint(2, 6)
    s = rng.choice([0, g, rng.randint(1, 9)])
    n = rng.randint(3 * g, 50)
    m = CoreContextAttention(24, 3, group_size=g, window_size=s, qkv_bias=seed % 2 == 0)
    x = torch.randn(2, n, 24, requires_grad=True)
    out, want = m(x), cca_reference(m, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    params = [x] + list(m.parameters())
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(want, params, grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_core_tokens_change_the_output():
    # a query far from the start sees core tokens: dropping them (huge window) must change its output
    torch.manual_seed(1)
    m = CoreContextAttention(16, 2, group_size=4, window_size=4)
    wide = CoreContextAttention(16, 2, group_size=4, window_size=64)
    wide.load_state_dict(m.state_dict())
    x = torch.randn(1, 40, 16)
    assert not torch.allclose(m(x)[:, -1], wide(x)[:, -1], atol=1e-3)
    torch.testing.assert_close(m(x)[:, :7], wide(x)[:, :7])  # t < 7: no core token yet, window reaches 0


def test_pattern_is_the_visibility_rule():
    m = CoreContextAttention(8, 1, group_size=3, window_size=4)
    n, g = 23, 3
    p = m.pattern(n)
    assert (p.n_q, p.n_kv) == (n, n + n // g)
    want = torch.zeros(n, n + n // g, dtype=torch.bool)
    for t in range(n):
        cores, raw = visible(t, n, g, 4)
        want[t, cores] = True
        want[t, [n // g + j for j in raw]] = True
    assert torch.equal(p.dense_mask(), want)


def test_bfloat16_forward_and_backward():
    torch.manual_seed(2)
    mb = CoreContextAttention(32, 4, group_size=4, window_size=6).to(torch.bfloat16)
    m = CoreContextAttention(32, 4, group_size=4, window_size=6)
    m.load_state_dict({k: v.float() for k, v in mb.state_dict().items()})  # the same (rounded) weights
    xb = torch.randn(2, 37, 32, dtype=torch.bfloat16, requires_grad=True)
    x = xb.detach().float().requires_grad_()
    out, want = mb(xb), cca_reference(m, x)
    assert out.dtype == torch.bfloat16

    def rel(a, b):
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).norm() / b.norm())

    assert rel(out, want) < 2e-2
    g = torch.randn(want.shape)
    ours = torch.autograd.grad(out, [xb] + list(mb.parameters()), g.bfloat16())
    theirs = torch.autograd.grad(want, [x] + list(m.parameters()), g)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16 and rel(a, b) < 5e-2


def test_torch_compile_eager():
    torch.manual_seed(3)
    m = CoreContextAttention(16, 2, group_size=4, window_size=4)
    x = torch.randn(1, 20, 16)
    want = m(x)  # eager first: the pattern and its plan are cached, dynamo traces only the tensor work
    torch.testing.assert_close(torch.compile(m, backend="eager")(x), want)


def test_errors():
    with pytest.raises(ValueError, match="dim must be divisible by num_heads, got 10 and 4"):
        CoreContextAttention(10, 4)
    with pytest.raises(ValueError, match="causal must be True"):
        CoreContextAttention(16, 2, causal=False)
    with pytest.raises(TypeError, match="group_size must be an int, got 2.0"):
        CoreContextAttention(16, 2, group_size=2.0)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of .* got 'fast'"):
        CoreContextAttention(16, 2, backend="fast")
    with pytest.raises(TypeError, match="qk_scale must be a number or None, got '1'"):
        CoreContextAttention(16, 2, qk_scale="1")
    m = CoreContextAttention(16, 2, group_size=4, window_size=8)
    with pytest.raises(ValueError, match=r"expects \(batch, tokens, dim\), got shape \(5, 16\)"):
        m(torch.randn(5, 16))
    with pytest.raises(ValueError, match="x has 8 channels but dim is 16"):
        m(torch.randn(1, 5, 8))
