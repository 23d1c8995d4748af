"""ScatteredLinearAttention against a loop over groups with dense (quadratic-form) linear attention."""

import random

import pytest
import torch
from torch.nn import functional as F

from foveal.nn.scatter import ScatteredLinearAttention, scattered_linear_attention


def dense_reference(module, x, group_ids, phi):
    """The paper's definition, one group at a time: A = φ(Q)φ(K)ᵀ, y = A V / (A 1 + eps)."""
    n, c = x.shape
    h = module.num_heads
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias).reshape(n, 3, h, c // h)
    out = torch.zeros(n, h, c // h, dtype=x.dtype)
    for g in sorted(set(group_ids.tolist())):
        idx = [i for i in range(n) if group_ids[i].item() == g]
        q, k, v = (qkv[idx, t].transpose(0, 1) for t in range(3))  # (h, n_g, d)
        a = phi(q) @ phi(k).transpose(1, 2)
        y = (a @ v) / (a.sum(-1, keepdim=True) + module.eps)
        out[idx] = y.transpose(0, 1)
    return F.linear(out.reshape(n, c), module.proj.weight, module.proj.bias)


PHI = {"relu": torch.relu, "elu+1": lambda t: torch.where(t > 0, t + 1, torch.exp(t))}


def _case(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 70)
    groups = rng.randint(1, 9)
    ids = [rng.choice(range(-3, 40, 3)[:groups]) for _ in range(n)]  # sparse ids, any order, some negative
    return n, torch.tensor(ids), rng


@pytest.mark.parametrize("feature_map", ["relu", "elu+1"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_over_groups_forward_and_backward(seed, feature_map):
    n, ids, rng = _case(seed)
    heads = rng.choice([1, 2, 4])
    dim = heads * rng.choice([3, 8])
    m = ScatteredLinearAttention(dim, heads, qkv_bias=seed % 2 == 0, feature_map=feature_map,
                                 chunk_size=rng.randint(1, 20))
    x = torch.randn(n, dim, requires_grad=True)
    out, want = m(x, ids), dense_reference(m, x, ids, PHI[feature_map])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out)
    params = [x] + list(m.parameters())
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_chunk_size_and_token_order_do_not_change_the_result():
    n, ids, _ = _case(7)
    m = ScatteredLinearAttention(16, 2)
    x = torch.randn(n, 16)
    perm = torch.randperm(n)
    a = m(x, ids)
    m.chunk_size = 3
    torch.testing.assert_close(m(x[perm], ids[perm]), a[perm], atol=1e-5, rtol=1e-5)


def test_bfloat16_loosely_matches_float32():
    """bf16 module vs the float32 reference on the same (bf16-rounded) weights and inputs."""
    n, ids, _ = _case(3)
    mb = ScatteredLinearAttention(16, 4, qkv_bias=True).to(torch.bfloat16)
    m = ScatteredLinearAttention(16, 4, qkv_bias=True)
    m.load_state_dict(mb.state_dict())
    xb = torch.randn(n, 16, dtype=torch.bfloat16, requires_grad=True)
    xf = xb.detach().float().requires_grad_()
    out, want = mb(xb, ids), dense_reference(m, xf, ids, torch.relu)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=0.05, rtol=0.05)
    g = torch.randn(out.shape)
    (out.float() * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(xb.grad.float(), xf.grad, atol=0.1, rtol=0.1)


def test_functional_with_empty_input_and_pattern():
    q = torch.rand(0, 2, 4)
    assert scattered_linear_attention(q, q, q, torch.zeros(0, dtype=torch.long)).shape == (0, 2, 4)
    m = ScatteredLinearAttention(8, 2)
    p = m.pattern(torch.tensor([5, 1, 5, 5, 1]))
    assert p.lengths == (2, 3) and bool(p.dense_mask()[0, 1]) and not bool(p.dense_mask()[1, 2])


def test_torch_compile_eager_smoke():
    m = ScatteredLinearAttention(8, 2)
    x, ids = torch.randn(10, 8), torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 3, 3])
    torch.testing.assert_close(torch.compile(m, backend="eager")(x, ids), m(x, ids))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="dim must be divisible by num_heads, got 10 and 4"):
        ScatteredLinearAttention(10, 4)
    with pytest.raises(ValueError, match=r"feature_map must be one of \['elu\+1', 'relu'\], got 'softmax'"):
        ScatteredLinearAttention(8, 2, feature_map="softmax")
    with pytest.raises(TypeError, match="chunk_size must be an int, got 2.5"):
        ScatteredLinearAttention(8, 2, chunk_size=2.5)
    with pytest.raises(ValueError, match=r"proj_drop must be in \[0, 1\), got 1.5"):
        ScatteredLinearAttention(8, 2, proj_drop=1.5)
    m = ScatteredLinearAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must be a \(tokens, dim\) tensor, got \(1, 5, 8\)"):
        m(torch.randn(1, 5, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="x has 6 channels but dim is 8"):
        m(torch.randn(5, 6), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="group_ids must hold integers"):
        m(torch.randn(5, 8), torch.zeros(5))
    with pytest.raises(ValueError, match=r"group_ids must have shape \(5,\), one id per token, got \(4,\)"):
        m(torch.randn(5, 8), torch.zeros(4, dtype=torch.long))
