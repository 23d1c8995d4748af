"""Random pattern instances (with their brute-force masks) for the tests."""

import random

import bruteforce as bf

from foveal import Causal, Full, GlobalTokens, Grid, Halo, Neighborhood, Sinks, SlidingWindow, Strided, Window


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def random_neighborhood(rng: random.Random, ndim: int, max_len: int = 12):
    shape = tuple(rng.randint(2, max_len) for _ in range(ndim))
    k, d, s, c = [], [], [], []
    for length in shape:
        kk = rng.randint(2, length)
        dd = rng.randint(1, max(1, length // kk))
        k.append(kk)
        d.append(dd)
        s.append(rng.randint(1, kk))
        c.append(rng.random() < 0.4)
    p = Neighborhood(shape, tuple(k), dilation=tuple(d), stride=tuple(s), causal=tuple(c))
    return p, bf.neighborhood(shape, k, d, s, c)


def random_pattern(rng: random.Random):
    """A random built-in pattern and its independent dense mask."""
    kind = rng.choice(["full", "causal", "sw", "global", "sinks", "strided", "na1", "na2", "na3", "window", "grid", "halo"])
    n = rng.randint(1, 70)
    if kind == "full":
        return Full(n), bf.full(n)
    if kind == "causal":
        return Causal(n), bf.causal(n)
    if kind == "sw":
        left, right, dil = rng.randint(0, 20), rng.randint(0, 20), rng.randint(1, 4)
        return SlidingWindow(n, left, right, dil), bf.sliding_window(n, left, right, dil)
    if kind == "global":
        c = rng.randint(1, n)
        return GlobalTokens(n, c), bf.global_tokens(n, c)
    if kind == "sinks":
        c = rng.randint(1, n)
        return Sinks(n, c), bf.sinks(n, c)
    if kind == "strided":
        s = rng.randint(1, n)
        return Strided(n, s), bf.strided(n, s)
    if kind in ("na1", "na2", "na3"):
        nd = int(kind[-1])
        return random_neighborhood(rng, nd, max_len={1: 40, 2: 10, 3: 6}[nd])
    nd = rng.choice([1, 2, 3])
    shape = tuple(rng.randint(2, {1: 40, 2: 10, 3: 6}[nd]) for _ in range(nd))
    if kind == "window":
        w = tuple(rng.choice(_divisors(s)) for s in shape)
        return Window(shape, w), bf.window(shape, w)
    if kind == "grid":
        g = tuple(rng.choice(_divisors(s)) for s in shape)
        return Grid(shape, g), bf.grid(shape, g)
    block = tuple(rng.randint(1, s) for s in shape)
    h = tuple(rng.randint(0, 3) for _ in shape)
    return Halo(shape, block, h), bf.halo(shape, block, h)
