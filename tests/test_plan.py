"""The gather plan (``foveal.kernels.plan``) against the patterns' dense masks, by brute force.

Every (query, key) pair a plan lets the kernel see, counted with multiplicity, must be
exactly the pattern's mask: each allowed pair once, nothing else. Random built-in
patterns, unions, intersections, N-D grids, cross patterns (n_kv != n_q) and ragged tiles.
"""

import random

import pytest
import torch
from strategies import random_pattern

from foveal import (BigBird, Causal, Dilated, Full, GlobalTokens, Halo, MaskPattern, Neighborhood, Power,
                    Sinks, SlidingWindow, Strided, Window, attend)
from foveal.kernels.plan import build_plan
from foveal.patterns.global_ import FlatPattern
from foveal.patterns.local import PaddedHalo


def plan_pairs(plan):
    """Dense (n_q, n_kv) count of how often the plan allows each pair, checking the slot contract on the way."""
    size = plan.group_size
    counts = torch.zeros(plan.n_q, plan.n_kv, dtype=torch.int64)
    slot = torch.arange(plan.num_slots)
    real = plan.token_slot[plan.slot_token] == slot  # padding slots point at token 0, whose slot is elsewhere
    assert int(real.sum()) == plan.n_q and torch.equal(torch.sort(plan.slot_token[real]).values, torch.arange(plan.n_q))
    start = 0
    for chunk in plan.chunks:
        c, nk = chunk.keys.shape
        assert chunk.slots.start == start and chunk.slots.stop - start == c * size
        start = chunk.slots.stop
        assert chunk.keys.dtype == torch.int64 and int(chunk.keys.min()) >= 0 and int(chunk.keys.max()) < plan.n_kv
        if chunk.allowed is None:
            allowed = torch.ones(c, size, nk, dtype=torch.bool)
        else:
            assert chunk.allowed.dtype == torch.bool and chunk.allowed.shape[0] in (1, c)
            assert tuple(chunk.allowed.shape[1:]) == (size, nk)
            allowed = chunk.allowed.expand(c, size, nk)
        rows = real[chunk.slots].view(c, size)
        assert not allowed[~rows].any(), "padding slots must allow nothing"
        empty = rows & ~allowed.any(-1)
        assert torch.equal(chunk.empty_rows if chunk.empty_rows is not None else torch.zeros_like(empty), empty)
        qtok = plan.slot_token[chunk.slots].view(c, size, 1).expand(c, size, nk)
        ktok = chunk.keys.view(c, 1, nk).expand(c, size, nk)
        counts.index_put_((qtok[allowed], ktok[allowed]), torch.ones(int(allowed.sum()), dtype=torch.int64),
                          accumulate=True)
    assert start == plan.num_slots
    return counts


def assert_exact(p, mask=None, tile=None):
    mask = p.dense_mask() if mask is None else mask
    plan = build_plan(p, tile)
    counts = plan_pairs(plan)
    assert torch.equal(counts, mask.long()), f"{p!r} tile={tile}: plan pairs differ from the mask"
    return plan


def _random_tile(rng, shape):
    return tuple(rng.randint(1, min(s, 9)) for s in shape)


@pytest.mark.parametrize("seed", range(30))
def test_plan_is_exact_on_random_patterns(seed):
    rng = random.Random(seed)
    p, mask = random_pattern(rng)
    assert_exact(p, mask)
    assert_exact(p, mask, tile=_random_tile(rng, p.shape))


@pytest.mark.parametrize("seed", range(30))
def test_plan_is_exact_on_unions_and_intersections(seed):
    rng = random.Random(100 + seed)
    a, ma = random_pattern(rng)
    others = [(GlobalTokens(a.shape, rng.randint(1, a.n)), None), (Causal(a.shape), None),
              (Sinks(a.shape, rng.randint(1, a.n)), None), (Strided(a.shape, rng.randint(1, a.n)), None),
              (SlidingWindow(a.shape, rng.randint(0, 9), rng.randint(0, 9), rng.randint(1, 3)), None)]
    b, _ = rng.choice(others)
    mb = b.dense_mask()
    if rng.random() < 0.5:
        p, mask = a | b, ma | mb
    else:
        p, mask = a & b, ma & mb
    if rng.random() < 0.3:
        c = Causal(a.shape)
        p, mask = p & c, mask & c.dense_mask()
    assert_exact(p, mask, tile=None if rng.random() < 0.5 else _random_tile(rng, p.shape))


@pytest.mark.parametrize("seed", range(12))
def test_plan_is_exact_for_cross_patterns(seed):
    rng = random.Random(300 + seed)
    nq, nk = rng.randint(1, 50), rng.randint(1, 50)
    p = rng.choice([
        lambda: Causal(nq, n_kv=nk),
        lambda: SlidingWindow(nq, rng.randint(0, 8), rng.randint(0, 8), rng.randint(1, 3), n_kv=nk),
        lambda: Full(nq, n_kv=nk) & SlidingWindow(nq, rng.randint(0, 8), n_kv=nk),
        lambda: SlidingWindow(nq, rng.randint(0, 8), n_kv=nk) | Sinks(nq, rng.randint(1, nk), n_kv=nk),
        lambda: PaddedHalo((rng.choice([4, 6, 8]), rng.choice([3, 6])), (2, 3), rng.randint(0, 2)),
    ])()
    assert_exact(p, tile=None if rng.random() < 0.5 else _random_tile(rng, p.shape))


def _random_flat(rng, n, depth=0):
    """A random tree of flat patterns on n tokens (windows, dilations, sinks, strides) joined by | and &."""
    if depth < 2 and rng.random() < 0.5:
        a, b = _random_flat(rng, n, depth + 1), _random_flat(rng, n, depth + 1)
        return a | b if rng.random() < 0.5 else a & b
    return rng.choice([
        lambda: SlidingWindow(n, rng.randint(0, 30), rng.randint(0, 10), rng.randint(1, 4)),
        lambda: Sinks(n, rng.randint(1, 6)),
        lambda: Strided(n, rng.randint(1, 9)),
        lambda: Causal(n),
        lambda: GlobalTokens(n, rng.randint(1, 5)),
        lambda: Dilated(n, rng.choice([16, 24, 40]), rng.randint(1, 5)),
    ])()


@pytest.mark.parametrize("seed", range(25))
def test_plan_is_exact_on_random_trees_of_flat_patterns(seed):
    # long enough for many groups with equal descriptors, so masks are shared across groups
    rng = random.Random(900 + seed)
    p = _random_flat(rng, rng.randint(60, 260))
    assert_exact(p, tile=(rng.choice([3, 4, 8, 16]),))


class _Table(FlatPattern):
    """Query i sees keys ``first[i] + step[i]·t`` for ``t < count[i]`` (keys outside [0, n) ignored)."""

    def __init__(self, n, first, step, count):
        self._init_shape(n)
        self._set(first=first, step=step, count=count)

    def progression(self, axis, x):
        return self.first[x], self.step[x], self.count[x]

    def _key(self):
        return (self.shape, tuple(self.first.tolist()), tuple(self.step.tolist()), tuple(self.count.tolist()))

    def __repr__(self):
        return f"_Table(n={self.n}, first={self.first.tolist()}, step={self.step.tolist()}, " \
               f"count={self.count.tolist()})"


def _random_table(rng, n, tile):
    """Tiles that repeat a few templates, translated: groups with equal descriptors but different key sets."""
    templates = [[(rng.randint(-4, 9), rng.randint(1, 3), rng.randint(0, 5)) for _ in range(tile)] for _ in range(3)]
    rows = [templates[rng.randrange(3)] for _ in range(-(-n // tile))]
    f, s, c = (torch.tensor([t * tile + row[i][j] * (j == 0) if j == 0 else row[i][j]
                             for t, row in enumerate(rows) for i in range(tile)][:n]) for j in range(3))
    return _Table(n, f, s, c)


@pytest.mark.parametrize("seed", range(25))
def test_plan_is_exact_on_translated_random_progressions(seed):
    rng = random.Random(1500 + seed)
    tile, n = rng.choice([2, 3, 4]), rng.randint(20, 90)
    a, b = _random_table(rng, n, tile), _random_table(rng, n, tile)
    p = rng.choice([a, a | b, a & b, (a | b) & _random_table(rng, n, tile)])
    assert_exact(p, tile=(tile,))


def assert_tight(plan):
    """Every gathered key is allowed for some query of its group, except trailing padding (key 0)."""
    for chunk in plan.chunks:
        c, nk = chunk.keys.shape
        allowed = torch.ones(c, 1, nk, dtype=torch.bool) if chunk.allowed is None else chunk.allowed.expand(c, -1, -1)
        used = allowed.any(1)  # (c, nk)
        trailing = torch.flip(torch.cumprod(torch.flip(~used, [1]).long(), 1), [1]).bool()
        assert (used | trailing).all() and not chunk.keys[trailing].any()


@pytest.mark.parametrize("seed", range(20))
def test_plan_key_sets_of_single_patterns_are_tight(seed):
    # a single progression pattern gathers exactly the keys its groups may see: nothing wasted
    rng = random.Random(1200 + seed)
    p, mask = random_pattern(rng)
    assert_tight(assert_exact(p, mask, tile=_random_tile(rng, p.shape)))


def test_plan_is_exact_for_long_context_patterns():
    n = 200
    for p in [Dilated(n, (32, 64), (1, 4)) & Causal(n), Dilated(n, (24, 40), (2, 3)), Power(n, 16, window=1, sinks=1),
              BigBird(n, 16, random=2),
              SlidingWindow(n, 40) | Sinks(n, 4), Causal(n) & SlidingWindow(n, 50, dilation=3),
              Strided(n, 7) | Causal(n), Halo((12, 20), (4, 5), 2) | GlobalTokens((12, 20), 3),
              Neighborhood((11, 13), (3, 5), dilation=(2, 1)) & Causal((11, 13)), Window((4, 6, 6), (2, 3, 3))]:
        assert_exact(p, tile=(7,) * len(p.shape) if len(p.shape) > 1 else None)


def test_plan_falls_back_for_other_patterns():
    # a mask the plan cannot read as progressions: one key_set per group, masks evaluated in batches
    p = MaskPattern(45, lambda qi, ki: ((qi * 7 + ki * 3) % 5 == 0) | (qi == ki), name="scattered")
    assert_exact(p)
    assert_exact(p | SlidingWindow(45, 3), tile=(4,))
    g = MaskPattern((6, 7), lambda qi, ki: (qi // 7 == ki // 7) & (ki % 2 == 0), name="even_in_row")
    assert_exact(g & Neighborhood((6, 7), 3))


def test_plan_shares_masks_and_stays_bounded():
    # interior runs of a sliding window share one mask; the keys gathered stay O(n · window)
    n, w = 1 << 13, 256
    plan = build_plan(SlidingWindow(n, w))
    assert plan.gathered_pairs() <= n * (w + 64)
    assert sum(c.allowed is not None and c.allowed.shape[0] > 1 for c in plan.chunks) <= 2
    assert plan.identity
    plan = build_plan(Neighborhood((64, 64), 7))
    assert plan.gathered_pairs() <= 64 * 64 * 196
    assert plan.mask_bytes() <= 64 * 196 * 64  # one 8x8 tile's mask per distinct border case, at most


@pytest.mark.parametrize("seed", range(6))
def test_cpu_equals_reference_on_planned_patterns(seed):
    rng = random.Random(700 + seed)
    p, _ = random_pattern(rng)
    p = p | GlobalTokens(p.shape, rng.randint(1, p.n)) if seed % 2 else p & Causal(p.shape)
    hkv = rng.choice([1, 2])
    q = torch.randn(rng.randint(1, 2), 2 * hkv, p.n, 8, requires_grad=True)
    k = torch.randn(q.shape[0], hkv, p.n, 8, requires_grad=True)
    v = torch.randn(q.shape[0], hkv, p.n, 8, requires_grad=True)
    out = attend(q, k, v, p, backend="cpu")
    ref = attend(q, k, v, p, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    ours = torch.autograd.grad((out * g).sum(), (q, k, v))
    theirs = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
