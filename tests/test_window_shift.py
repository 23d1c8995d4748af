"""Window(grid, window, shift): Swin's shifted windows against roll + partition + Swin's region mask."""

import itertools
import math
import random

import pytest
import torch

from foveal import BlockLayout, attend
from foveal.patterns.local import Window


def swin_shifted_mask(shape, window, shift):
    """Dense (n, n) mask of Swin's SW-MSA, written as Swin does it, in original token order.

    Roll the grid by ``-shift``, label the rolled grid with Swin's regions (the slices
    ``[0, -w)``, ``[-w, -s)``, ``[-s, None)`` per axis, numbered over their product),
    partition into windows; two tokens interact iff they share a window and a region.
    """
    nd = len(shape)
    region = torch.zeros(shape, dtype=torch.int64)
    cnt = 0
    per_axis = [(slice(0, -window[a]), slice(-window[a], -shift[a]), slice(-shift[a], None)) for a in range(nd)]
    for sl in itertools.product(*per_axis):
        region[sl] = cnt
        cnt += 1
    # rolled position r holds the original token x = (r + s) mod L; label every original token
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, nd)
    rolled = torch.stack([(coords[:, a] - shift[a]) % shape[a] for a in range(nd)], -1)
    win = torch.stack([rolled[:, a] // window[a] for a in range(nd)], -1)
    reg = region[tuple(rolled[:, a] for a in range(nd))]
    same_window = (win[:, None, :] == win[None, :, :]).all(-1)
    return same_window & (reg[:, None] == reg[None, :])


def _random_case(rng, nd):
    """A grid of whole windows; shifts mostly non-zero (a zero shift on an axis is today's window)."""
    max_w, max_m = {1: (8, 5), 2: (5, 3), 3: (3, 3)}[nd]
    window = tuple(rng.randint(1, max_w) for _ in range(nd))
    shape = tuple(w * rng.randint(1, max_m) for w in window)
    shift = tuple(rng.randint(1, w - 1) if w > 1 and rng.random() < 0.85 else rng.randrange(w) for w in window)
    return shape, window, shift


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_shifted_window_mask_matches_swin(nd, seed):
    rng = random.Random(100 * nd + seed)
    shape, window, shift = _random_case(rng, nd)
    p = Window(shape, window, shift=shift)
    want = swin_shifted_mask(shape, window, shift)
    assert torch.equal(p.dense_mask(), want), (shape, window, shift)
    assert p.num_allowed() == int(want.sum())
    bq, bk = rng.randint(1, p.n + 2), rng.randint(1, p.n + 2)
    got, exact = p.layout(bq, bk), BlockLayout.from_dense_mask(want, bq, bk)
    assert torch.equal(got.block_states(), exact.block_states()), (p, bq, bk)
    q = torch.tensor(sorted(rng.sample(range(p.n), rng.randint(1, p.n))))
    keys = p.key_set(q)
    assert torch.isin(torch.nonzero(want[q].any(0)).flatten(), keys).all()


def test_the_groups_of_one_axis():
    # L = 8, w = 4, s = 1: groups [0, 1), [1, 5), [5, 8)
    m = Window(8, 4, shift=1).dense_mask()
    groups = [[0], [1, 2, 3, 4], [5, 6, 7]]
    want = torch.zeros(8, 8, dtype=torch.bool)
    for g in groups:
        for i in g:
            want[i, g] = True
    assert torch.equal(m, want)


def test_zero_shift_is_todays_window():
    a, b = Window((8, 12), (4, 3)), Window((8, 12), (4, 3), shift=0)
    assert a == b and hash(a) == hash(b) and repr(a) == repr(b) == "Window(grid=(8, 12), window=(4, 3))"
    assert a._key() == ((8, 12), (4, 3))
    assert torch.equal(a.layout(16, 16).block_states(), b.layout(16, 16).block_states())
    s = Window((8, 12), (4, 3), shift=(2, 1))
    assert s != a and repr(s) == "Window(grid=(8, 12), window=(4, 3), shift=(2, 1))"
    import foveal.patterns as P

    assert eval(repr(s), {"__builtins__": {}}, {"Window": P.Window}) == s


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: Window((8, 8), 4, shift=4), ValueError, r"shift\[0\]=4 is not < window\[0\]=4"),
        (lambda: Window((8, 8), (4, 2), shift=(1, 3)), ValueError, r"shift\[1\]=3 is not < window\[1\]=2"),
        (lambda: Window((8, 8), 4, shift=-1), ValueError, r"shift must be >= 0, got -1"),
        (lambda: Window((8, 8), 4, shift=(1, 1, 1)), ValueError, r"shift must be an int or a tuple of 2 ints"),
        (lambda: Window((8, 8), 4, shift=1.5), TypeError, r"shift must be an int or a tuple of 2 ints, got 1.5"),
    ],
)
def test_bad_shift_is_refused(make, err, match):
    with pytest.raises(err, match=match):
        make()


@pytest.mark.parametrize(
    "shape, window, shift, dtype",
    [
        ((8, 8), (4, 4), (2, 2), torch.float32),
        ((12, 6), (4, 3), (3, 1), torch.float32),
        ((6, 4, 4), (3, 2, 4), (1, 1, 2), torch.float32),
        ((30,), (10,), (7,), torch.float32),
        ((8, 8), (4, 4), (1, 3), torch.bfloat16),
    ],
)
def test_cpu_kernel_matches_reference_on_shifted_windows(shape, window, shift, dtype):
    p = Window(shape, window, shift=shift)
    n = math.prod(shape)
    q = torch.randn(2, 4, n, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, n, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, n, 8, dtype=dtype, requires_grad=True)
    out = attend(q, k, v, p, backend="cpu")
    ref = attend(q, k, v, p, backend="reference")
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=4 * tol, rtol=4 * tol)
