"""na_av and ContMix (OverLoCK) against dense implementations written from the definitions."""

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

import bruteforce as bf
from foveal.functional_na import na_av
from foveal.nn.contmix import ContMix
from foveal.patterns import Neighborhood


# -- na_av ---------------------------------------------------------------------------


def na_av_loop(weights, v, kernel_size, dilation):
    """Brute force: for every query, its keys from ``Neighborhood(...).mask`` in row-major order."""
    b, h, *grid, d = v.shape
    n = math.prod(grid)
    pattern = Neighborhood(tuple(grid), kernel_size, dilation)
    w = weights.reshape(b, h, n, -1)
    vf = v.reshape(b, h, n, d)
    rows = []
    for i in range(n):
        keys = [j for j in range(n) if bool(pattern.mask(torch.tensor(i), torch.tensor(j)))]
        assert len(keys) == w.shape[-1]
        rows.append(sum(w[:, :, i, t, None] * vf[:, :, j] for t, j in enumerate(keys)))
    return torch.stack(rows, 2).reshape(v.shape)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_na_av_matches_loop_forward_and_backward(nd, seed):
    rng = random.Random(10 * nd + seed)
    grid = tuple(rng.randint(3, {1: 12, 2: 6, 3: 4}[nd]) for _ in range(nd))
    k = tuple(rng.randint(1, s) for s in grid)
    dil = tuple(rng.randint(1, s // kk) for s, kk in zip(grid, k))
    w = torch.randn(2, 3, *grid, math.prod(k), requires_grad=True)
    v = torch.randn(2, 3, *grid, 4, requires_grad=True)
    out, want = na_av(w, v, k, dil), na_av_loop(w, v, k, dil)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (w, v), g), torch.autograd.grad(want, (w, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_na_av_bfloat16_accumulates_in_float32():
    """bf16 in and out, but the window sum in float32: only the final rounding (~2^-9) is lost, forward and backward."""
    w = torch.softmax(torch.randn(2, 2, 12, 12, 49), -1).bfloat16().requires_grad_()
    v = torch.randn(2, 2, 12, 12, 8).bfloat16().requires_grad_()
    w64, v64 = (t.detach().double().requires_grad_() for t in (w, v))
    out, want = na_av(w, v, 7), na_av_loop(w64, v64, (7, 7), (1, 1))
    assert out.dtype == torch.bfloat16

    def rel(a, b):
        return float((a.detach().double() - b.detach()).norm() / b.detach().norm())

    assert rel(out, want) < 4e-3  # a bf16 running sum over 49 terms is ~5x worse
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.bfloat16())
    want.backward(g)
    assert w.grad.dtype == v.grad.dtype == torch.bfloat16
    assert rel(w.grad, w64.grad) < 8e-3 and rel(v.grad, v64.grad) < 8e-3


def test_na_av_bfloat16_gradcheck_and_errors():
    w = torch.randn(2, 2, 5, 6, 9)
    v = torch.randn(2, 2, 5, 6, 3)
    out = na_av(w.bfloat16(), v.bfloat16(), 3)
    torch.testing.assert_close(out.float(), na_av_loop(w, v, (3, 3), (1, 1)), atol=0.1, rtol=0.05)
    w64 = torch.randn(1, 2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    v64 = torch.randn(1, 2, 4, 5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: na_av(a, b, 2, (2, 1)), (w64, v64))
    with pytest.raises(ValueError, match=r"weights must be .* = \(2, 2, 5, 6, 25\)"):
        na_av(w, v, 5)
    with pytest.raises(ValueError, match=r"kernel_size\[0\]=7 > grid\[0\]=5"):
        na_av(torch.randn(2, 2, 5, 6, 49), v, 7)
    with pytest.raises(TypeError, match="weights must be a torch.Tensor"):
        na_av(None, v, 3)
    with pytest.raises(ValueError, match="v must be"):
        na_av(w, v[0, 0], 3)


# -- ContMix -------------------------------------------------------------------------


def _neighbours(grid, k):
    """Keys of each pixel, in row-major order, from the brute-force NATTEN definition."""
    mask = bf.neighborhood(grid, (k, k), (1, 1), (1, 1), (False, False))
    return [torch.nonzero(row).flatten().tolist() for row in mask]


def dense_contmix(m, x, ctx):
    """ContMix written out densely: every pixel's dynamic kernels scattered into an N×N matrix."""
    b, h0, w0, c = x.shape
    g, k, s = m.num_heads, m.kernel_size, m.smk_size
    if min(h0, w0) < k:
        size = (k, int(k / h0 * w0)) if h0 < w0 else (int(k / w0 * h0), k)
        def up(t):
            t = F.interpolate(t.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
            return t.permute(0, 2, 3, 1)

        x, ctx = up(x), up(ctx)
    _, h, w, _ = x.shape
    n, cq = h * w, c // 2 // g
    q = (x.reshape(b, n, c) @ m.weight_query.weight.T) * (c // g) ** -0.5
    # region pooling by explicit adaptive-average bins
    reg = m.region
    pooled = []
    for ry, rx in itertools.product(range(reg), range(reg)):
        y0, y1 = (ry * h) // reg, -(-((ry + 1) * h) // reg)
        x0, x1 = (rx * w) // reg, -(-((rx + 1) * w) // reg)
        pooled.append(ctx[:, y0:y1, x0:x1].mean((1, 2)))
    key = torch.stack(pooled, 1) @ m.weight_key.weight.T  # (B, S², c/2)
    out = torch.zeros(b, n, c, dtype=x.dtype)
    vals = x.reshape(b, n, c)
    for head in range(g):
        qh, kh = q[..., head * cq : (head + 1) * cq], key[..., head * cq : (head + 1) * cq]
        aff = torch.einsum("bnc,blc->bnl", qh, kh)
        kern = aff @ m.weight_proj.weight.T + m.weight_proj.bias  # (B, N, s²+k²)
        for branch, (ks, table, lo) in enumerate(((s, m.rpb1, 0), (k, m.rpb2, s * s))):
            logits = kern[..., lo : lo + ks * ks]
            nbrs = _neighbours((h, w), ks)
            dense = torch.full((b, n, n), float("-inf"), dtype=x.dtype)
            for i, keys in enumerate(nbrs):
                yi, xi = divmod(i, w)
                for t, j in enumerate(keys):
                    yj, xj = divmod(j, w)
                    bias = table[head, yj - yi + ks - 1, xj - xi + ks - 1] if table is not None else 0.0
                    dense[:, i, j] = logits[:, i, t] + bias
            cv = c // (2 * g)
            ch = slice(branch * g * cv + head * cv, branch * g * cv + (head + 1) * cv)
            out[..., ch] = torch.softmax(dense, -1) @ vals[..., ch]
    out = out.reshape(b, h, w, c)
    if (h, w) != (h0, w0):
        out = F.adaptive_avg_pool2d(out.permute(0, 3, 1, 2), (h0, w0)).permute(0, 2, 3, 1)
    return F.linear(out, m.proj.weight, m.proj.bias)


CASES = [  # (grid, dim, heads, kernel, small kernel, region, ctx_dim)
    ((7, 8), 16, 2, 5, 3, 3, None),
    ((6, 9), 24, 3, 3, 3, 2, 8),
    ((4, 5), 8, 2, 5, 3, 2, None),  # smaller than the kernel: the reference's resize path
]


@pytest.mark.parametrize("case", CASES)
def test_contmix_matches_dense_forward_and_backward(case):
    grid, dim, heads, k, s, reg, ctx_dim = case
    m = ContMix(dim, kernel_size=k, num_heads=heads, region=reg, smk_size=s, ctx_dim=ctx_dim)
    with torch.no_grad():  # the reference zero-initialises the tables; make them matter
        m.rpb1.normal_()
        m.rpb2.normal_()
    x = torch.randn(2, *grid, dim, requires_grad=True)
    ctx = torch.randn(2, *grid, ctx_dim, requires_grad=True) if ctx_dim else None
    out = m(x, ctx)
    want = dense_contmix(m, x, x if ctx is None else ctx)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    inputs = [x] + ([ctx] if ctx is not None else []) + list(m.parameters())
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_contmix_without_bias_bfloat16_and_compile():
    m = ContMix(16, kernel_size=5, num_heads=2, region=3, smk_size=3, rel_pos_bias=False)
    x = torch.randn(2, 6, 7, 16)
    want = dense_contmix(m, x, x)
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    out = m.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.1)
    m = m.float()  # the round trip through bfloat16 rounded the parameters: recompute the reference
    torch.testing.assert_close(torch.compile(m, backend="eager")(x), dense_contmix(m, x, x), atol=1e-5, rtol=1e-5)
    assert m.pattern((6, 7)) == Neighborhood((6, 7), 5)


def test_contmix_errors():
    with pytest.raises(ValueError, match="dim must be divisible by 2 \\* num_heads.*dim=12 and num_heads=4"):
        ContMix(12, num_heads=4)
    with pytest.raises(ValueError, match="kernel_size must be odd .* got 4"):
        ContMix(16, kernel_size=4, num_heads=2)
    m = ContMix(16, kernel_size=3, num_heads=2, smk_size=3, region=2)
    with pytest.raises(ValueError, match=r"ContMix expects \(batch, height, width, dim\), got shape \(5, 5, 16\)"):
        m(torch.randn(5, 5, 16))
    with pytest.raises(ValueError, match="x has 8 channels but dim is 16"):
        m(torch.randn(1, 5, 5, 8))
    with pytest.raises(ValueError, match=r"context must have shape .* = \(1, 5, 5, 16\), got \(1, 4, 5, 16\)"):
        m(torch.randn(1, 5, 5, 16), torch.randn(1, 4, 5, 16))
    msg = r"context must match x in dtype and device \(torch.float32, cpu\), got torch.float64"
    with pytest.raises(TypeError, match=msg):
        m(torch.randn(1, 5, 5, 16), torch.randn(1, 5, 5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"qk_scale must be > 0 .*got -1"):
        ContMix(16, 2, qk_scale=-1)


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_contmix_bfloat16_forward_and_backward_against_dense():
    """bf16 module against the float32 dense reference on the same (rounded) weights and input."""
    torch.manual_seed(3)
    mb = ContMix(16, 2, kernel_size=5, region=3, smk_size=3).to(torch.bfloat16)
    with torch.no_grad():
        mb.rpb1.normal_()
        mb.rpb2.normal_()
    m = ContMix(16, 2, kernel_size=5, region=3, smk_size=3)
    m.load_state_dict({k: v.float() for k, v in mb.state_dict().items()})
    xb = torch.randn(2, 6, 7, 16, dtype=torch.bfloat16, requires_grad=True)
    x = xb.detach().float().requires_grad_()
    out, want = mb(xb), dense_contmix(m, x, x)
    assert out.dtype == torch.bfloat16 and _rel(out, want) < 0.02
    g = torch.randn(want.shape)
    ours = torch.autograd.grad(out, [xb] + list(mb.parameters()), g.bfloat16())
    theirs = torch.autograd.grad(want, [x] + list(m.parameters()), g)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16 and _rel(a, b) < 0.05
