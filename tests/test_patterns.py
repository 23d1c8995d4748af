"""Every pattern's mask against its independent brute-force definition; density; reprs."""

import random

import pytest
import torch
from strategies import random_neighborhood, random_pattern

import bruteforce as bf
from foveal import (
    Causal,
    Full,
    GlobalTokens,
    Grid,
    Halo,
    MaskPattern,
    Neighborhood,
    Sinks,
    SlidingWindow,
    Strided,
    Window,
)
from foveal.gallery import GALLERY


@pytest.mark.parametrize("seed", range(150))
def test_random_pattern_matches_bruteforce(seed):
    p, expected = random_pattern(random.Random(seed))
    assert torch.equal(p.dense_mask(), expected), p
    assert p.num_allowed() == int(expected.sum()), p
    assert p.density() == pytest.approx(expected.float().mean().item()), p


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_neighborhood_matches_bruteforce(seed, ndim):
    p, expected = random_neighborhood(random.Random(1000 * ndim + seed), ndim)
    assert torch.equal(p.dense_mask(), expected), p


def test_neighborhood_every_query_has_kernel_size_keys_when_not_causal():
    p = Neighborhood((11, 9), kernel_size=(4, 5), dilation=(2, 1), stride=(3, 2))
    assert torch.all(p.dense_mask().sum(1) == 20)


def test_mask_is_vectorised_and_broadcasts():
    p = Neighborhood((8, 8), 3)
    q = torch.arange(64)
    rows = p.mask(q[:, None], q[None, :])
    assert rows.shape == (64, 64)
    one = p.mask(torch.tensor(27), q)
    assert torch.equal(one, rows[27])
    assert torch.equal(p.mask_mod(0, 0, q[:, None], q[None, :]), rows)


def test_flat_patterns_accept_grids():
    assert torch.equal(Causal((4, 5)).dense_mask(), bf.causal(20))
    assert Causal((4, 5)).shape == (4, 5)


def test_union_and_intersection_masks():
    a, b = SlidingWindow(50, 4), Sinks(50, 3)
    sinks = torch.tensor([[j < 3 and j <= i for j in range(50)] for i in range(50)])  # causal sinks
    assert torch.equal((a | b).dense_mask(), bf.sliding_window(50, 4, 0, 1) | sinks)
    assert torch.equal((a & Causal(50)).dense_mask(), bf.sliding_window(50, 4, 0, 1) & bf.causal(50))
    u = Neighborhood((6, 7), 3) | GlobalTokens((6, 7), 2) | Strided(42, 5)
    expected = bf.neighborhood((6, 7), (3, 3), (1, 1), (1, 1), (False, False)) | bf.global_tokens(42, 2) | bf.strided(42, 5)
    assert torch.equal(u.dense_mask(), expected)
    assert u.shape == (6, 7)
    assert len(u.parts) == 3  # flattened
    assert u.density() == pytest.approx(expected.float().mean().item())


def test_custom_mask_pattern():
    p = MaskPattern(30, lambda q, k: (q - k).abs() <= 2, name="band")
    assert torch.equal(p.dense_mask(), bf.sliding_window(30, 2, 2, 1))
    assert p.density() == pytest.approx(bf.sliding_window(30, 2, 2, 1).float().mean().item())
    assert "chunked" in repr(p)


def test_patterns_are_immutable_and_hashable():
    p = Neighborhood((8, 8), 3)
    with pytest.raises(AttributeError):
        p.kernel_size = 5
    assert p == Neighborhood((8, 8), (3, 3))
    assert len({p, Neighborhood((8, 8), 3), Neighborhood((8, 8), 5)}) == 2


@pytest.mark.parametrize("name", sorted(GALLERY))
def test_repr_round_trips(name):
    import foveal.patterns as P

    p = GALLERY[name]
    namespace = {k: getattr(P, k) for k in P.__all__}
    assert eval(repr(p), {"__builtins__": {}}, namespace) == p


def test_density_of_large_analytic_patterns_needs_no_dense_matrix():
    # A dense mask of 2**20 x 2**20 would be 1 TiB; the analytic count is instant.
    n = 1 << 20
    p = SlidingWindow(n, 1023)
    expected = sum(min(i, 1023) + 1 for i in range(0, n, 1))  # keys per query
    assert p.num_allowed() == expected
    g = Neighborhood((512, 512), 7)
    assert g.num_allowed() == 512 * 512 * 49


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Neighborhood((8, 8), 9), r"kernel_size\[0\]=9 > grid\[0\]=8"),
        (lambda: Neighborhood((8, 8), 3, dilation=3), r"3 \* 3 = 9 > grid\[0\]=8"),
        (lambda: Neighborhood((8, 8), 3, stride=4), r"stride\[0\]=4 > 3"),
        (lambda: Neighborhood((8, 8), (3, 3, 3)), r"kernel_size must be an int or a tuple of 2 ints"),
        (lambda: Neighborhood((8, 8), 0), r"kernel_size must be >= 1, got 0"),
        (lambda: Neighborhood((8, 8), 3, causal=(True,)), r"causal must be a bool or a tuple of 2 bools"),
        (lambda: Window((10, 10), 3), r"grid\[0\]=10 is not divisible by window\[0\]=3"),
        (lambda: Window((8, 8), -2), r"window must be >= 1, got -2"),
        (lambda: Grid((12, 12), 5), r"grid\[0\]=12 is not divisible by size\[0\]=5"),
        (lambda: Halo((8, 8), 9, 1), r"block\[0\]=9 > grid\[0\]=8"),
        (lambda: Halo((8, 8), 4, -1), r"halo must be >= 0, got -1"),
        (lambda: SlidingWindow(10, -1), r"left must be >= 0, got -1"),
        (lambda: SlidingWindow(10, 2, dilation=0), r"dilation must be >= 1, got 0"),
        (lambda: GlobalTokens(10, 11), r"count must be <= the number of tokens 10, got 11"),
        (lambda: Sinks(10, 0), r"count must be >= 1, got 0"),
        (lambda: Strided(10, 0), r"stride must be >= 1, got 0"),
        (lambda: Full(0), r"n must be >= 1, got 0"),
        (lambda: Causal((4, 0)), r"n\[1\] must be >= 1, got 0"),
        (lambda: SlidingWindow(10, 2) | Causal(11), r"same number of tokens"),
        (lambda: Neighborhood((4, 6), 3) | Window((6, 4), 2), r"must share one grid"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Neighborhood((8, 8), 2.5), r"kernel_size must be an int"),
        (lambda: Full("64"), r"n must be a positive int or a non-empty tuple"),
        (lambda: SlidingWindow(10, True), r"left must be an int"),
        (lambda: Causal(8) | "x", r"can only combine Patterns"),
        (lambda: MaskPattern(8, 3), r"fn must be callable"),
    ],
)
def test_bad_argument_types_raise_type_errors(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_neighborhood_fast_mask_equals_the_progression_definition():
    from foveal.patterns.base import ProgressionPattern

    rng = random.Random(5)
    for _ in range(40):
        shape = tuple(rng.randint(3, 14) for _ in range(rng.randint(1, 3)))
        k = tuple(rng.randint(1, s) for s in shape)
        p = Neighborhood(shape, k)
        q = torch.arange(p.n)[:, None]
        j = torch.arange(p.n)[None, :]
        assert torch.equal(p.mask(q, j), ProgressionPattern.mask(p, q, j)), p
