"""HierarchicalLocalAttention (Scale-DiT) against a dense implementation written from the paper."""

import pytest
import torch

from foveal.nn.hierarchical import HierarchicalLocalAttention
from foveal.patterns import Window
from foveal.patterns.order import Ordered
from precision import assert_close64


def hilbert_cells(side):
    """Cells (row, col) of the Hilbert curve of a side×side grid, by the recursive quadrant construction.

    Each level visits four sub-squares; the first is the curve transposed, the last the
    curve anti-transposed (x = column, y = row; starts at (0, 0), ends at (0, side-1)).
    """
    if side == 1:
        return [(0, 0)]
    h = side // 2
    sub = hilbert_cells(h)
    out = [(c, r) for r, c in sub]  # lower-left quadrant in curve terms: transposed
    out += [(r + h, c) for r, c in sub]
    out += [(r + h, c + h) for r, c in sub]
    out += [(h - 1 - c, side - 1 - r) for r, c in sub]  # anti-transposed
    return out


def window_mask(rows, cols, window):
    """mask[i, j] over row-major tokens: same run of ``window`` consecutive tokens of the curve."""
    side = 1
    while side < max(rows, cols):
        side *= 2
    rank = torch.full((rows * cols,), -1, dtype=torch.int64)
    r = 0
    for y, x in hilbert_cells(side):
        if y < rows and x < cols:
            rank[y * cols + x] = r
            r += 1
    assert (rank >= 0).all()
    block = rank // window
    return block[:, None] == block[None, :]


def dense_reference(m, x, low=None):
    """Scale-DiT attention written densely: one softmax over [window keys ; latent keys]."""
    b, hh, ww, c = x.shape
    n, h, d = hh * ww, m.num_heads, c // m.num_heads

    def heads(t):
        qkv = torch.nn.functional.linear(t.reshape(b, -1, c), m.qkv.weight, m.qkv.bias)
        return qkv.reshape(b, -1, 3, h, d).permute(2, 0, 3, 1, 4)

    q, k, v = heads(x)
    if low is not None:
        low_in = low
    elif m.pool is not None:
        p = m.pool
        low_in = x.reshape(b, hh // p, p, ww // p, p, c).mean((2, 4))
    else:  # no latent: local windows only
        low_in = x[:, :0, :0]
    ql, kl, vl = heads(low_in)
    mask = window_mask(hh, ww, m.window_size**2)
    s_local = (q @ k.transpose(-1, -2) * m.scale).masked_fill(~mask, float("-inf"))
    s_global = q @ kl.transpose(-1, -2) * m.scale
    attn = torch.softmax(torch.cat([s_local, s_global], -1), -1)
    out = attn @ torch.cat([v, vl], 2)
    out = torch.nn.functional.linear(out.transpose(1, 2).reshape(b, hh, ww, c), m.proj.weight, m.proj.bias)
    if low is None:
        return out
    out_low = torch.softmax(ql @ kl.transpose(-1, -2) * m.scale, -1) @ vl
    out_low = torch.nn.functional.linear(out_low.transpose(1, 2).reshape(low.shape), m.proj.weight, m.proj.bias)
    return out, out_low


CASES = [
    # grid, window_size, pool, explicit latent grid
    ((8, 8), 2, 2, None),
    ((16, 16), 4, 4, None),
    ((6, 10), 3, 2, None),  # not a power of two; 9 does not divide 60: a shorter last window
    ((8, 8), 2, None, (3, 3)),  # the paper's separate low-resolution stream
    ((4, 8), 2, None, None),  # local windows only
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_dense_forward_and_backward(case):
    grid, ws, pool, low_grid = CASES[case]
    m = HierarchicalLocalAttention(24, 3, window_size=ws, pool=pool).double()  # float64 (tests/precision.py)
    x = torch.randn(2, *grid, 24, dtype=torch.float64, requires_grad=True)
    low = None if low_grid is None else torch.randn(2, *low_grid, 24, dtype=torch.float64, requires_grad=True)
    out, want = m(x, low), dense_reference(m, x, low)
    outs, wants = (out, want) if low is not None else ((out,), (want,))
    inputs = [x] + ([low] if low is not None else []) + list(m.parameters())
    gs = [torch.randn_like(o) for o in outs]
    for a, b in zip(outs, wants):
        assert_close64(a, b)
    got = torch.autograd.grad(outs, inputs, gs)
    exp = torch.autograd.grad(wants, inputs, gs)
    for a, b in zip(got, exp):
        assert_close64(a, b)


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_bfloat16_matches_dense_loosely_forward_and_backward():
    torch.manual_seed(4)
    mb = HierarchicalLocalAttention(16, 2, window_size=2, pool=2).to(torch.bfloat16)
    m = HierarchicalLocalAttention(16, 2, window_size=2, pool=2)
    m.load_state_dict({k: v.float() for k, v in mb.state_dict().items()})  # the same (rounded) weights
    xb = torch.randn(2, 8, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    x = xb.detach().float().requires_grad_()
    out, want = mb(xb), dense_reference(m, x)
    assert out.dtype == torch.bfloat16
    assert _rel(out, want) < 2e-2
    g = torch.randn(want.shape)
    ours = torch.autograd.grad(out, [xb] + list(mb.parameters()), g.bfloat16())
    theirs = torch.autograd.grad(want, [x] + list(m.parameters()), g)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16 and _rel(a, b) < 5e-2


def test_pattern_is_hilbert_windows():
    m = HierarchicalLocalAttention(8, 1, window_size=4, pool=2)
    p = m.pattern((16, 16))
    assert isinstance(p, Ordered) and p.inner == Window((256,), 16) and p.order == "hilbert"
    assert torch.equal(p.dense_mask(), window_mask(16, 16, 16))
    # on a 2^n grid each window is an aligned 4×4 square
    assert int(p.dense_mask()[0].sum()) == 16
    assert p.dense_mask()[0].view(16, 16)[:4, :4].all()


def test_compiles():
    m = HierarchicalLocalAttention(8, 2, window_size=2, pool=2)
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        want = m(x)  # eager first: the patterns' kernel plans are cached, so tracing stays short
        torch.testing.assert_close(torch.compile(m, backend="eager")(x), want)


def test_errors():
    with pytest.raises(ValueError, match="dim must be divisible by num_heads, got 10 and 4"):
        HierarchicalLocalAttention(10, 4)
    with pytest.raises(ValueError, match=r"order must be one of \['hilbert', 'morton', 'raster'\], got 'peano'"):
        HierarchicalLocalAttention(8, 2, order="peano")
    with pytest.raises(TypeError, match=r"window_size must be an int, got 2.5"):
        HierarchicalLocalAttention(8, 2, window_size=2.5)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of .* got 'fast'"):
        HierarchicalLocalAttention(8, 2, backend="fast")
    m = HierarchicalLocalAttention(8, 2, window_size=4, pool=3)
    msg = r"HierarchicalLocalAttention expects \(batch, height, width, dim\), got shape \(8, 8, 8\)"
    with pytest.raises(ValueError, match=msg):
        m(torch.randn(8, 8, 8))
    with pytest.raises(ValueError, match="x has 6 channels but dim is 8"):
        m(torch.randn(1, 6, 6, 6))
    with pytest.raises(ValueError, match=r"pool must divide the grid; pool=3, grid \(8, 8\)"):
        m(torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"window_size=4 gives 16 tokens per window but grid \(3, 3\) has 9"):
        m(torch.randn(1, 3, 3, 8))
    with pytest.raises(ValueError, match=r"low must be \(batch=1, h, w, dim=8\) or None, got \(2, 2, 2, 8\)"):
        m(torch.randn(1, 6, 6, 8), torch.randn(2, 2, 2, 8))
    with pytest.raises(TypeError, match=r"low must match x in dtype and device \(torch.float32, cpu\)"):
        m(torch.randn(1, 6, 6, 8), torch.randn(1, 2, 2, 8, dtype=torch.float64))
