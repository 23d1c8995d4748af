"""HaloAttention against an independent dense HaloNet (tiles unfolded with their halo, relative logits per pair)."""

import itertools
import math
import random

import pytest
import torch

from foveal.functional import attend
from foveal.nn.halo import HaloAttention, PaddedHalo
from foveal.patterns import Halo


def dense_halonet(m, x):
    """HaloNet written from the paper, tile by tile.

    The projected keys/values are placed on a canvas framed by ``halo`` (and grown to a
    whole number of blocks); every block of queries takes the (block + 2·halo)² window of
    the canvas around it. Scores: ``q·k/sqrt(d) + q·r^h[Δy] + q·r^w[Δx]`` with the
    embedding of each (query, key) pair gathered from the tables (timm's row for offset
    Δ is ``Δ + win − 1 + halo``). Canvas positions outside the image are zero keys and
    values that take part (border "zeros") or are excluded (border "mask").
    """
    b, h, w, c = x.shape
    nh, bs, hs = m.num_heads, m.block_size, m.halo_size
    d, win = c // nh, bs + 2 * hs
    q = x @ m.q.weight[:, :, 0, 0].T
    kv = x @ m.kv.weight[:, :, 0, 0].T
    if m.q.bias is not None:
        q, kv = q + m.q.bias, kv + m.kv.bias
    q = q.reshape(b, h, w, nh, d)
    kv = kv.reshape(b, h, w, nh, 2, d)
    hb, wb = math.ceil(h / bs) * bs, math.ceil(w / bs) * bs
    canvas_k = torch.zeros(b, hb + 2 * hs, wb + 2 * hs, nh, d, dtype=x.dtype)
    canvas_v = torch.zeros_like(canvas_k)
    inside = torch.zeros(hb + 2 * hs, wb + 2 * hs, dtype=torch.bool)
    canvas_k[:, hs : hs + h, hs : hs + w] = kv[..., 0, :]
    canvas_v[:, hs : hs + h, hs : hs + w] = kv[..., 1, :]
    inside[hs : hs + h, hs : hs + w] = True
    out = torch.zeros(b, h, w, nh, d, dtype=x.dtype)
    for by in range(hb // bs):
        for bx in range(wb // bs):
            y0, x0 = by * bs, bx * bs
            y1, x1 = min(y0 + bs, h), min(x0 + bs, w)
            qt = q[:, y0:y1, x0:x1].reshape(b, -1, nh, d)
            kt = canvas_k[:, y0 : y0 + win, x0 : x0 + win].reshape(b, -1, nh, d)
            vt = canvas_v[:, y0 : y0 + win, x0 : x0 + win].reshape(b, -1, nh, d)
            ok = inside[y0 : y0 + win, x0 : x0 + win].reshape(-1)
            s = torch.einsum("bqhd,bkhd->bhqk", qt, kt) * m.scale
            if m.pos_embed is not None:
                qy = torch.arange(y0, y1).repeat_interleave(x1 - x0)
                qx = torch.arange(x0, x1).repeat(y1 - y0)
                ky = (torch.arange(win) + y0 - hs).repeat_interleave(win)
                kx = (torch.arange(win) + x0 - hs).repeat(win)
                rows_y = ky[None, :] - qy[:, None] + win - 1 + hs
                rows_x = kx[None, :] - qx[:, None] + win - 1 + hs
                r = m.pos_embed.height_rel[rows_y] + m.pos_embed.width_rel[rows_x]  # (nq, nk, d)
                rel = torch.einsum("bqhd,qkd->bhqk", qt, r)
                s = s + (rel * m.scale if m.scale_pos_embed else rel)
            if m.border == "mask":
                s = s.masked_fill(~ok, float("-inf"))
            o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vt)
            out[:, y0:y1, x0:x1] = o.reshape(b, y1 - y0, x1 - x0, nh, d)
    return out.reshape(b, h, w, c)


def _case(rng, border):
    bs, hs = rng.choice([2, 3, 4]), rng.choice([0, 1, 2])
    # zeros on a grid the block does not divide: padded up to whole blocks with zero keys (timm refuses it)
    h, w = rng.randint(bs, 3 * bs + 1), rng.randint(bs, 3 * bs + 1)
    nh = rng.choice([1, 2])
    return (h, w), dict(num_heads=nh, block_size=bs, halo_size=hs), nh * rng.choice([4, 8])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("border", ["zeros", "mask"])
def test_matches_dense_halonet_forward_and_backward(border, seed):
    rng = random.Random(seed + 7 * (border == "mask"))
    grid, kwargs, dim = _case(rng, border)
    m = HaloAttention(dim, border=border, qkv_bias=seed == 1, scale_pos_embed=seed == 2, **kwargs)
    x = torch.randn(2, *grid, dim, requires_grad=True)
    out, want = m(x), dense_halonet(m, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    params = [x] + list(m.parameters())
    got, ref = torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the relative logits carry gradient to the embeddings (through the score term's tables)
    assert got[-1].abs().sum() > 0 and got[-2].abs().sum() > 0


@pytest.mark.parametrize("border", ["zeros", "mask"])
def test_reference_backend_and_no_rel_pos(border):
    m = HaloAttention(8, num_heads=2, block_size=2, halo_size=1, border=border, backend="reference")
    x = torch.randn(2, 4, 6, 8, requires_grad=True)
    out, want = m(x), dense_halonet(m, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    params = [x, m.pos_embed.height_rel, m.pos_embed.width_rel, m.q.weight]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    plain = HaloAttention(8, num_heads=2, block_size=2, halo_size=1, border=border, rel_pos=None)
    assert plain.pos_embed is None
    torch.testing.assert_close(plain(x), dense_halonet(plain, x), atol=1e-5, rtol=1e-5)


def test_zeros_and_mask_differ_only_at_borders():
    m = HaloAttention(8, num_heads=2, block_size=2, halo_size=1)
    x = torch.randn(1, 6, 6, 8)
    m_mask = HaloAttention(8, num_heads=2, block_size=2, halo_size=1, border="mask")
    m_mask.load_state_dict(m.state_dict())
    a, b = m(x), m_mask(x)
    torch.testing.assert_close(a[:, 2:4, 2:4], b[:, 2:4, 2:4])  # interior tile: its window has no padding
    assert not torch.allclose(a[:, :2, :2], b[:, :2, :2])


def test_bfloat16_patterns_compile_and_errors():
    m = HaloAttention(16, num_heads=2, block_size=2, halo_size=1)
    x = torch.randn(2, 4, 4, 16)
    want = dense_halonet(m, x)
    assert m.pattern((4, 4)) == PaddedHalo((4, 4), 2, 1) and m.pattern((4, 4)).kv_shape == (6, 6)
    assert HaloAttention(16, 2, 2, 1, border="mask").pattern((5, 4)) == Halo((5, 4), 2, 1)
    # PaddedHalo's mask: the tile's window on the padded grid, every query sees (block + 2 halo)^2 keys
    mask = PaddedHalo((4, 4), 2, 1).dense_mask()
    assert mask.shape == (16, 36) and bool((mask.sum(1) == 16).all())
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)  # eager first: the compile reuses the cached plan
    torch.testing.assert_close(torch.compile(m, backend="eager")(x), want, atol=1e-5, rtol=1e-5)
    out = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=5e-2, rtol=5e-2)
    with pytest.raises(ValueError, match="dim must be divisible by num_heads, got 10 and 4"):
        HaloAttention(10, 4)
    with pytest.raises(ValueError, match=r"border must be one of \('zeros', 'mask'\), got 'clip'"):
        HaloAttention(16, border="clip")
    with pytest.raises(ValueError, match="rel_pos must be one of"):
        HaloAttention(16, rel_pos="bias")
    assert HaloAttention(16, 2, 2, 1)(torch.randn(1, 5, 4, 16)).shape == (1, 5, 4, 16)  # padded to whole blocks
    with pytest.raises(ValueError, match=r"block must be <= the grid.*block\[0\]=8 > grid\[0\]=4"):
        HaloAttention(16, 2, border="mask")(torch.randn(1, 4, 8, 16))
    with pytest.raises(ValueError, match="x has 8 channels but dim is 16"):
        HaloAttention(16, 2)(torch.randn(1, 8, 8, 8))


@pytest.mark.parametrize("grid, block, halo", [((6,), 2, 1), ((4, 6), (2, 3), (1, 0)), ((2, 4, 4), 2, (0, 1, 2))])
def test_padded_halo_pattern_against_loops_and_cpu_kernel(grid, block, halo):
    p = PaddedHalo(grid, block, halo)
    _check_padded_halo(p, grid, block, halo, 1)
    with pytest.raises(ValueError, match="not divisible by block"):
        PaddedHalo(tuple(g + 1 for g in grid), block, halo)


@pytest.mark.parametrize("grid, block, halo, stride", [((3,), 6, 1, 2), ((4, 2), (4, 6), (1, 2), (2, 3)), ((2, 4), 4, 3, 2)])
def test_strided_padded_halo_pattern(grid, block, halo, stride):
    # timm's strided HaloAttn: queries on the input subsampled by stride, each tile keeps its input tile's keys
    p = PaddedHalo(grid, block, halo, stride)
    _check_padded_halo(p, grid, block, halo, stride)
    assert "stride=" in repr(p) and p.stride == ((stride,) * len(grid) if isinstance(stride, int) else stride)
    with pytest.raises(ValueError, match="stride must divide block"):
        PaddedHalo(grid, 5, halo, 2)


def _check_padded_halo(p, grid, block, halo, stride):
    nd = len(grid)
    block = (block,) * nd if isinstance(block, int) else block
    halo = (halo,) * nd if isinstance(halo, int) else halo
    stride = (stride,) * nd if isinstance(stride, int) else stride
    kv_grid = tuple(g * s + 2 * h for g, s, h in zip(grid, stride, halo))
    qs, ks = list(itertools.product(*map(range, grid))), list(itertools.product(*map(range, kv_grid)))

    def allowed(q, k):  # padded key coordinate within [input tile start, tile end + 2 halo)
        starts = [q[a] * stride[a] // block[a] * block[a] for a in range(nd)]
        return all(starts[a] <= k[a] < starts[a] + block[a] + 2 * halo[a] for a in range(nd))

    want = torch.tensor([[allowed(q, k) for k in ks] for q in qs])
    assert p.kv_shape == kv_grid and torch.equal(p.dense_mask(), want)
    assert p.num_allowed() == int(want.sum())
    q = torch.randn(2, 2, p.n_q, 4)
    k, v = torch.randn(2, 2, p.n_kv, 4), torch.randn(2, 2, p.n_kv, 4)
    a, b = attend(q, k, v, p, backend="cpu"), attend(q, k, v, p, backend="reference")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
