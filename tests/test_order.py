"""Token orders against independent definitions; Ordered patterns on every backend against dense attention."""

import itertools
import math
import random

import pytest
import torch

import bruteforce as bf
from foveal.bias import ALiBi, RelativePositionBias
from foveal.functional import attend
from foveal.patterns import Causal, SlidingWindow, Window
from foveal.patterns.order import Ordered, hilbert, morton, raster, tiles


# -- independent definitions, plain Python ---------------------------------------------------
def d2xy(side, d):
    """The classic Hilbert-curve index-to-cell loop: (x, y) of step ``d`` on a side×side curve."""
    x = y = 0
    t, s = d, 1
    while s < side:
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        x += s * rx
        y += s * ry
        t //= 4
        s *= 2
    return x, y


def hilbert_by_walking(rows, cols):
    """Walk the enclosing power-of-two curve, keep the cells inside the grid (x = column, y = row)."""
    side = 1
    while side < max(rows, cols):
        side *= 2
    perm = []
    for d in range(side * side):
        x, y = d2xy(side, d)
        if y < rows and x < cols:
            perm.append(y * cols + x)
    return perm


def morton_by_strings(shape):
    """Sort cells by the binary string that takes one bit of every axis (axis 0 first), MSB first."""
    bits = max(max(1, (s - 1).bit_length()) for s in shape)
    cells = list(itertools.product(*[range(s) for s in shape]))

    def code(c):
        parts = [format(v, f"0{bits}b") for v in c]
        return "".join(p[b] for b in range(bits) for p in parts)

    flat = {c: i for i, c in enumerate(cells)}
    return [flat[c] for c in sorted(cells, key=code)]


def tiles_by_loops(shape, tile):
    """Tiles row-major, cells row-major inside each tile."""
    ranges = [range(0, s, t) for s, t in zip(shape, tile)]
    strides = [math.prod(shape[a + 1 :]) for a in range(len(shape))]
    perm = []
    for start in itertools.product(*ranges):
        inner = [range(st, min(st + t, s)) for st, t, s in zip(start, tile, shape)]
        for c in itertools.product(*inner):
            perm.append(sum(v * st for v, st in zip(c, strides)))
    return perm


def is_permutation(perm, n):
    return perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(n))


# -- orders ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (4, 4), (8, 8), (16, 16), (3, 5), (6, 11), (16, 5), (1, 9)])
def test_hilbert_is_the_classic_curve(shape):
    perm = hilbert(shape)
    assert is_permutation(perm, math.prod(shape))
    assert perm.tolist() == hilbert_by_walking(*shape)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_hilbert_neighbours_are_adjacent_and_aligned_squares_are_runs(n):
    side = 2**n
    perm = hilbert((side, side))
    rows, cols = perm // side, perm % side
    steps = (rows.diff().abs() + cols.diff().abs()).tolist()
    assert steps == [1] * (side * side - 1)
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(perm.numel())
    grid_rank = rank.view(side, side)
    for k in range(n + 1):
        w = 2**k
        for r0, c0 in itertools.product(range(0, side, w), repeat=2):
            block = grid_rank[r0 : r0 + w, c0 : c0 + w].flatten()
            lo = int(block.min())
            assert lo % (w * w) == 0 and sorted(block.tolist()) == list(range(lo, lo + w * w))


@pytest.mark.parametrize("shape", [(4, 4), (8, 8), (3, 7), (2, 4, 4), (3, 5, 2), (13,)])
def test_morton_matches_bit_strings(shape):
    perm = morton(shape)
    assert is_permutation(perm, math.prod(shape))
    assert perm.tolist() == morton_by_strings(shape)


def test_morton_aligned_squares_are_runs():
    side = 16
    rank = torch.empty(side * side, dtype=torch.int64)
    rank[morton((side, side))] = torch.arange(side * side)
    for w in (2, 4, 8):
        for r0, c0 in itertools.product(range(0, side, w), repeat=2):
            block = sorted(rank.view(side, side)[r0 : r0 + w, c0 : c0 + w].flatten().tolist())
            assert block == list(range(block[0], block[0] + w * w))


TILE_CASES = [((4, 6), (2, 3)), ((5, 7), (2, 3)), ((4, 4, 6), (2, 2, 3)), ((3, 5, 4), 2), ((9,), 4)]


@pytest.mark.parametrize("shape,tile", TILE_CASES)
def test_tiles_and_raster(shape, tile):
    perm = tiles(shape, tile)
    assert is_permutation(perm, math.prod(shape))
    assert perm.tolist() == tiles_by_loops(shape, (tile,) * len(shape) if isinstance(tile, int) else tile)
    assert raster(shape).tolist() == list(range(math.prod(shape)))


def test_orders_refuse_bad_input():
    with pytest.raises(ValueError, match=r"hilbert needs a 2-D grid \(rows, cols\), got shape \(2, 2, 2\)"):
        hilbert((2, 2, 2))
    with pytest.raises(ValueError, match=r"tile\[1\]=5 > shape\[1\]=4"):
        tiles((4, 4), (2, 5))
    with pytest.raises(TypeError, match="shape must be a positive int or a non-empty tuple"):
        morton("8x8")
    with pytest.raises(ValueError, match=r"shape\[0\] must be >= 1, got 0"):
        raster((0, 3))


# -- Ordered ---------------------------------------------------------------------------------
def ordered_dense(inner_dense, perm):
    """mask[perm[a], perm[b]] = inner[a, b]: the inner pattern on tokens taken in the order."""
    n = len(perm)
    m = torch.zeros(n, n, dtype=torch.bool)
    for a in range(n):
        for b in range(n):
            m[perm[a], perm[b]] = inner_dense[a, b]
    return m


CASES = [
    ((8, 8), "hilbert", lambda n: Window((n,), 16), lambda n: bf.window((n,), (16,))),
    ((6, 5), "hilbert", lambda n: SlidingWindow(n, 4, 3), lambda n: bf.sliding_window(n, 4, 3, 1)),
    ((4, 4, 2), "morton", lambda n: Causal(n), lambda n: bf.causal(n)),
    ((5, 6), "tiles", lambda n: SlidingWindow(n, 5, 2, dilation=2), lambda n: bf.sliding_window(n, 5, 2, 2)),
]


def _order(name, grid):
    return tiles(grid, 2) if name == "tiles" else name


@pytest.mark.parametrize("case", range(len(CASES)))
def test_ordered_mask_is_the_inner_pattern_in_the_order(case):
    grid, name, make, dense = CASES[case]
    n = math.prod(grid)
    p = Ordered(make(n), _order(name, grid), grid)
    want = ordered_dense(dense(n), p.perm().tolist())
    assert torch.equal(p.dense_mask(), want)
    assert p.shape == grid and p.n_q == p.n_kv == n


def dense_attention(q, k, v, mask, bias=None):
    """Softmax attention with a boolean mask, written directly (GQA by repeating k/v heads)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ v.float()).to(q.dtype), torch.logsumexp(s, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_attend_ordered_matches_dense_forward_and_backward(case, dtype):
    grid, name, make, dense = CASES[case]
    rng = random.Random(case)
    n = math.prod(grid)
    p = Ordered(make(n), _order(name, grid), grid)
    mask = ordered_dense(dense(n), p.perm().tolist())
    hkv = rng.choice([1, 2])
    q = torch.randn(2, 2 * hkv, n, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(2, hkv, n, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(2, hkv, n, 6, dtype=dtype, requires_grad=True)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    want, want_lse = dense_attention(q, k, v, mask)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad((want.float() * g.float()).sum() + want_lse.sum(), (q, k, v))
    for backend in ("cpu", "reference", "auto"):
        out, lse = attend(q, k, v, p, backend=backend, return_lse=True)
        torch.testing.assert_close(out, want, **tol)
        torch.testing.assert_close(lse, want_lse, **tol)
        grads = torch.autograd.grad((out.float() * g.float()).sum() + lse.sum(), (q, k, v))
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a.float(), b.float(), **tol)


def test_attend_ordered_with_a_learned_bias():
    grid = (8, 8)
    p = Ordered(Window((64,), 16), "hilbert", grid)
    table = torch.randn(2, 15, 15, requires_grad=True)
    rpb = RelativePositionBias(grid, 7, table)
    q, k, v = (torch.randn(2, 2, 64, 8, requires_grad=True) for _ in range(3))
    # the term by loops over (row, col) coordinates, in row-major token order
    idx = torch.zeros(64, 64, 2, dtype=torch.int64)
    for i, j in itertools.product(range(64), repeat=2):
        idx[i, j, 0] = max(-7, min(7, j // 8 - i // 8)) + 7
        idx[i, j, 1] = max(-7, min(7, j % 8 - i % 8)) + 7
    mask = ordered_dense(bf.window((64,), (16,)), p.perm().tolist())
    want, _ = dense_attention(q, k, v, mask, table[:, idx[..., 0], idx[..., 1]])
    out = attend(q, k, v, p, bias=rpb, backend="cpu")
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, table), g), torch.autograd.grad(want, (q, k, v, table), g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    alibi = ALiBi(2)
    torch.testing.assert_close(
        attend(q, k, v, p, bias=alibi, backend="cpu"), attend(q, k, v, p, bias=alibi, backend="reference"),
        atol=2e-5, rtol=2e-5,
    )


def test_ordered_patterns_in_one_order_combine_inside_it():
    grid = (8, 8)
    a = Ordered(Window((64,), 16), "hilbert", grid)
    b = Ordered(Causal(64), "hilbert", grid)
    u, i = a | b, a & b
    assert isinstance(u, Ordered) and isinstance(i, Ordered)
    assert torch.equal(u.dense_mask(), a.dense_mask() | b.dense_mask())
    assert torch.equal(i.dense_mask(), a.dense_mask() & b.dense_mask())
    c = Ordered(Causal(64), "morton", grid)
    assert not isinstance(a | c, Ordered)
    assert torch.equal((a | c).dense_mask(), a.dense_mask() | c.dense_mask())
    assert a == Ordered(Window((64,), 16), hilbert(grid), grid) and a != c


def test_ordered_refuses_bad_input():
    with pytest.raises(ValueError, match=r"inner must have one query and one key per token of grid \(4, 4\) \(16\)"):
        Ordered(Causal(15), "hilbert", (4, 4))
    with pytest.raises(TypeError, match="inner must be a foveal Pattern, got str"):
        Ordered("causal", "hilbert", (4, 4))
    with pytest.raises(ValueError, match=r"order must be one of \['hilbert', 'morton', 'raster'\]"):
        Ordered(Causal(16), "peano", (4, 4))
    with pytest.raises(ValueError, match="order must be a permutation of 0..15"):
        Ordered(Causal(16), torch.zeros(16, dtype=torch.int64), (4, 4))
    with pytest.raises(ValueError, match=r"got torch.int64 tensor of shape \(15,\)"):
        Ordered(Causal(16), torch.arange(15), (4, 4))
    # a list of ints is a permutation (what the repr of a custom order prints); anything else is refused
    assert Ordered(Causal(16), list(range(16)), (4, 4)) == Ordered(Causal(16), torch.arange(16), (4, 4))
    with pytest.raises(TypeError, match="a LongTensor permutation or a list of ints, got list"):
        Ordered(Causal(16), [float(i) for i in range(16)], (4, 4))


def test_attend_never_evaluates_the_ordered_mask(monkeypatch):
    grid = (64, 64)
    p = Ordered(Window((4096,), 64), "hilbert", grid)

    def refuse(*args):
        raise AssertionError("a kernel evaluated Ordered.mask instead of running the inner pattern in order")

    monkeypatch.setattr(Ordered, "mask", refuse)
    q, k, v = (torch.randn(1, 1, 4096, 8) for _ in range(3))
    out = attend(q, k, v, p, backend="cpu")
    # each aligned 8×8 square attends within itself: check one square against dense attention
    rows, cols = torch.meshgrid(torch.arange(16, 24), torch.arange(8, 16), indexing="ij")
    tok = (rows * 64 + cols).flatten()
    s = q[0, 0, tok] @ k[0, 0, tok].T / math.sqrt(8)
    torch.testing.assert_close(out[0, 0, tok], torch.softmax(s, -1) @ v[0, 0, tok], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_grid_runs_as_contiguous_groups_with_the_same_mask(seed):
    """attend runs Grid through Grid.as_ordered(): same mask, same output and gradients (with a strided table bias)."""
    import random

    from foveal import Grid, attend
    from foveal.bias import RelativePositionBias

    rng = random.Random(seed)
    nd = rng.choice([1, 2, 3])
    size = tuple(rng.randint(1, 3) for _ in range(nd))
    grid = tuple(s * rng.randint(1, 3) for s in size)
    g = Grid(grid, size)
    qi, ki = torch.arange(g.n)[:, None], torch.arange(g.n)[None, :]
    assert torch.equal(g.as_ordered().mask(qi, ki), g.mask(qi, ki))
    step = tuple(n // s for n, s in zip(grid, size))
    table = torch.randn(2, *(2 * s - 1 for s in size), requires_grad=True)
    bias = RelativePositionBias(grid, tuple(s - 1 for s in size), table, step=step)
    q, k, v = (torch.randn(2, 2, g.n, 8, requires_grad=True) for _ in range(3))
    outs = [attend(q, k, v, g, bias=bias, backend=b) for b in ("cpu", "reference")]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(o.square().sum(), (q, k, v, table)) for o in outs]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
