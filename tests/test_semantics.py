"""Pattern semantics the field uses: causal sinks, exact causality, which keys a later query may see, reprs.

Each rule is checked against a definition written here (loops over (i, j), or the
dense mask read directly), never against the implementation's own numbers.
"""

import random

import pytest
import torch
from strategies import random_pattern

import foveal.patterns as P
from foveal import BlockLayout
from foveal.patterns import (
    BigBird,
    Causal,
    CausalBlockwise,
    Dilated,
    Document,
    Full,
    GlobalTokens,
    Grid,
    Halo,
    MaskPattern,
    Neighborhood,
    Ordered,
    PaddedHalo,
    Pattern,
    Power,
    PrefixLM,
    SharedQuestion,
    Sinks,
    SlidingWindow,
    Strided,
    Window,
    tiles,
)
from foveal.patterns.algebra import Intersection, Union
from foveal.patterns.causality import is_causal


def loops(nq, nkv, rule):
    return torch.tensor([[bool(rule(i, j)) for j in range(nkv)] for i in range(nq)], dtype=torch.bool)


# -- sinks are causal -------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(30))
def test_sinks_are_causal_and_aligned_bottom_right(seed):
    rng = random.Random(seed)
    nq = rng.randint(1, 40)
    nkv = nq if seed % 3 == 0 else rng.randint(1, 40)
    count = rng.randint(1, nkv)
    p = Sinks(nq, count, n_kv=nkv)
    want = loops(nq, nkv, lambda i, j: j < count and j <= i + nkv - nq)
    assert torch.equal(p.dense_mask(), want), p
    assert p.num_allowed() == int(want.sum())
    assert p.layout_method == "analytic"
    bq, bk = rng.randint(1, 9), rng.randint(1, 9)
    assert torch.equal(p.layout(bq, bk).block_states(), BlockLayout.from_dense_mask(want, bq, bk).block_states())


def test_streaming_llm_first_queries_see_no_later_sink():
    m = (SlidingWindow(16, 3) | Sinks(16, 4)).dense_mask()
    assert not m.triu(1).any()
    assert m[0].tolist() == [True] + [False] * 15


# -- causality ----------------------------------------------------------------------------
def _random_any(rng):
    """A random pattern of any kind: built-in, combined, cross, custom or ordered."""
    kind = rng.choice(["builtin", "and_causal", "union", "cross", "custom", "ordered", "lm"])
    n = rng.randint(2, 40)
    if kind == "builtin":
        return random_pattern(rng)[0]
    if kind == "and_causal":
        p = random_pattern(rng)[0]
        return p & Causal(p.shape)
    if kind == "union":
        return SlidingWindow(n, rng.randint(0, 5), rng.choice([0, 0, 1])) | Sinks(n, rng.randint(1, n))
    if kind == "cross":
        nkv = rng.randint(1, 40)
        return SlidingWindow(n, rng.randint(0, 5), rng.choice([0, 1]), n_kv=nkv) | Sinks(n, rng.randint(1, nkv), n_kv=nkv)
    if kind == "custom":
        i0 = rng.randint(0, n - 2)
        return Causal(n) | MaskPattern(n, lambda i, j: (i == i0) & (j == i0 + 1), name="one_late_pair") \
            if rng.random() < 0.5 else MaskPattern(n, lambda i, j: j <= i // 2, name="half")
    if kind == "ordered":
        return Ordered(SlidingWindow(16, rng.randint(0, 4), rng.choice([0, 1])), rng.choice(["hilbert", "morton"]),
                       (4, 4))
    return rng.choice([PrefixLM(n, rng.randint(0, n)), Power(n, rng.randint(1, 5)), Dilated(n, 8, 2),
                       Document([n // 2, n - n // 2], Causal), CausalBlockwise([n // 2, n - n // 2]),
                       BigBird(n, 4), SlidingWindow(n, 3, 1) & Strided(n, 2), SlidingWindow(n, 3) & Strided(n, 2)])


@pytest.mark.parametrize("seed", range(80))
def test_is_causal_is_exact(seed):
    p = _random_any(random.Random(seed))
    offset = p.n_kv - p.n_q
    want = not bool(p.dense_mask().triu(1 + offset).any())
    assert is_causal(p) == want, p


def test_is_causal_refuses_what_is_not_a_pattern():
    with pytest.raises(TypeError, match="pattern must be a foveal Pattern, got str"):
        is_causal("causal")


# -- which keys a later query may still see ----------------------------------------------
def _random_decoding_family(rng):
    """A random instance of every class with its own ``visible_later`` rule (cross n_kv where supported)."""
    n = rng.randint(1, 45)
    nkv = rng.choice([n, rng.randint(1, 45)])
    left, right, d = rng.randint(0, 12), rng.randint(0, 4), rng.randint(1, 4)
    count = rng.randint(1, nkv)
    segs = [rng.randint(1, 20) for _ in range(rng.randint(1, 3))]
    return [
        Full(n, n_kv=nkv),
        Causal(n, n_kv=nkv),
        Sinks(n, count, n_kv=nkv),
        GlobalTokens(n, count, n_kv=nkv),
        Strided(n, rng.randint(1, n)),
        SlidingWindow(n, left, right, d, n_kv=nkv),
        Dilated(n, tuple(segs), tuple(rng.randint(1, s) for s in segs)),
        Power(n, rng.randint(1, 6), rng.randint(0, 3), rng.randint(0, 2)),
        SlidingWindow(n, left, right, d, n_kv=nkv) | Sinks(n, count, n_kv=nkv),
        Strided(n, rng.randint(1, n)) & Causal(n),
        SlidingWindow(n, left, right, d) & Causal(n) & Full(n),
        SlidingWindow(n, left, right, d) & Strided(n, rng.randint(1, n)),  # no part to drop: chunked
        # Causal may drop out only for keys before t: this part alone sees later keys
        Causal(n) & MaskPattern(n, lambda i, j: (j - i) % 3 == 1, name="later_by_3k_plus_1"),
    ]


OVERRIDES = [Full, Causal, Sinks, GlobalTokens, Strided, SlidingWindow, Power, Union,
             Intersection]


def test_the_built_in_rules_are_overrides():
    for cls in OVERRIDES:
        assert cls.visible_later is not Pattern.visible_later, cls
    from foveal.patterns.sparse import _DilatedSegment

    assert _DilatedSegment.visible_later is not Pattern.visible_later


@pytest.mark.parametrize("seed", range(40))
def test_visible_later_overrides_match_the_exact_default(seed):
    rng = random.Random(seed)
    for p in _random_decoding_family(rng):
        dense = p.dense_mask()
        keys = torch.tensor([rng.randrange(p.n_kv) for _ in range(rng.randint(1, 2 * p.n_kv))])
        for t in sorted({0, rng.randint(0, p.n_q), rng.randint(0, p.n_q), p.n_q - 1, p.n_q, p.n_q + 3} - {-1}):
            got = p.visible_later(keys, t)
            assert torch.equal(got, Pattern.visible_later(p, keys, t)), (p, t)
            want = dense[t:][:, keys].any(0) if t < p.n_q else torch.zeros_like(keys, dtype=torch.bool)
            assert torch.equal(got, want), (p, t)
        # decoding asks with the cached keys, all before t: the Causal part of an intersection drops out
        t = rng.randint(0, p.n_q)
        early = torch.arange(min(t, p.n_kv))
        assert torch.equal(p.visible_later(early, t), Pattern.visible_later(p, early, t)), (p, t)


def test_visible_later_default_works_in_chunks(monkeypatch):
    import foveal.patterns.base as base

    p = MaskPattern(50, lambda i, j: (j <= i) & ((i - j) % 7 == 0), name="every_seventh")
    keys = torch.arange(50)
    want = torch.tensor([bool(p.dense_mask()[20:, j].any()) for j in range(50)])
    monkeypatch.setattr(base, "_WORK_ELEMENTS", 120)  # two or three queries per chunk
    assert torch.equal(p.visible_later(keys, 20), want)
    assert torch.equal(p.visible_later(keys.view(5, 10), 20), want.view(5, 10))


def test_visible_later_refuses_bad_arguments():
    p = SlidingWindow(10, 2)
    with pytest.raises(TypeError, match="key_pos must be an integer tensor of key positions, got torch.float32"):
        p.visible_later(torch.zeros(3), 2)
    with pytest.raises(TypeError, match="key_pos must be an integer tensor"):
        Pattern.visible_later(MaskPattern(10, lambda i, j: j <= i), [1, 2], 2)
    with pytest.raises(TypeError, match="t must be an int, got True"):
        p.visible_later(torch.arange(3), True)
    with pytest.raises(ValueError, match="t must be >= 0, got -1"):
        p.visible_later(torch.arange(3), -1)
    with pytest.raises(ValueError, match=r"key_pos must hold key positions in \[0, 10\).*got values in \[0, 10\]"):
        p.visible_later(torch.arange(11), 2)


# -- every repr rebuilds its pattern ---------------------------------------------------------
def _one_of_every_class():
    return [
        Full(10), Full(10, n_kv=14), Full((3, 4)),
        Causal(10), Causal(6, n_kv=9), Causal((3, 4)),
        SlidingWindow(12, 3, 1, dilation=2, n_kv=15), SlidingWindow((3, 4), 2),
        Neighborhood((6, 6), 3, dilation=2, causal=(True, False)), Neighborhood(12, 5, stride=2),
        Window((8, 8), 4, shift=2), Window((8, 8), (2, 4)),
        Grid((8, 8), 2), Halo((8, 8), 4, 1), PaddedHalo((8, 8), 4, 1),
        GlobalTokens(10, 2, n_kv=12), GlobalTokens((3, 4), 2),
        Sinks(10, 3, n_kv=12), Sinks((3, 4), 2),
        Strided(12, 3), Strided((3, 4), 3),
        Dilated(12, (4, 8), (1, 2)), Dilated((4, 4), 8, 2),
        Power(16, 4), Power((4, 4), 2, window=0, sinks=2),
        BigBird(16, 4), BigBird((4, 4), 2, window=1, globals=0, random=2, seed=3),
        Document([3, 4], Causal), Document([3, 4], Full),
        PrefixLM(10, 0), PrefixLM(10, 10), PrefixLM((3, 4), 5),
        SharedQuestion([3, 4]), CausalBlockwise([3, 4, 2]),
        SlidingWindow(10, 2) | Sinks(10, 2), Strided(10, 2) & Causal(10),
        (SlidingWindow(10, 2) | Sinks(10, 2)) & Causal(10) & Strided(10, 3),
        Ordered(Causal(16), "hilbert", (4, 4)), Ordered(SlidingWindow(16, 3), "morton", (4, 4)),
        Ordered(Window(16, 4), tiles((4, 4), 2), (4, 4)), Ordered(Causal(12), "raster", (3, 4)),
    ]


def test_every_pattern_class_repr_round_trips():
    namespace = dict(vars(P))
    instances = _one_of_every_class()
    for p in instances:
        rebuilt = eval(repr(p), namespace)
        assert rebuilt == p and type(rebuilt) is type(p), repr(p)
        assert torch.equal(rebuilt.dense_mask(), p.dense_mask()), repr(p)
    # every public pattern class is covered; MaskPattern is exempt: it holds a function, its repr names it
    classes = {getattr(P, name) for name in P.__all__ if isinstance(getattr(P, name), type)}
    concrete = {c for c in classes if issubclass(c, Pattern)} - {Pattern, P.ProgressionPattern, MaskPattern}
    assert concrete <= {type(p) for p in instances}, concrete - {type(p) for p in instances}


def test_ordered_takes_a_permutation_as_a_list():
    perm = tiles((4, 4), 2)
    a = Ordered(Window(16, 4), perm, (4, 4))
    assert Ordered(Window(16, 4), perm.tolist(), (4, 4)) == a
    assert "order=[" in repr(a) and "order='hilbert'" in repr(Ordered(Causal(16), "hilbert", (4, 4)))
    with pytest.raises(ValueError, match="order must be a permutation of 0..15"):
        Ordered(Window(16, 4), [0] * 16, (4, 4))
    with pytest.raises(TypeError, match="order must be one of"):
        Ordered(Window(16, 4), 3.5, (4, 4))
