"""The one density solver of the quality benchmarks: the integer knob of a pattern family nearest a density.

Every pattern family of the quality suites has one integer knob (a window, a block, a
budget); a suite compares families at equal density, so it solves each knob for a
target density. ``solve_knob`` does that for any ``density(knob)``: by bisection when
the density does not decrease with the knob (about ``log2(hi - lo) + 2`` evaluations,
for densities costly to evaluate: selections on a real model's q and k), or, for a
knob whose density is not monotone (a stride and a window in one knob), by a scan of a
geometric grid refined around its best point. Ties go to the smaller knob.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from foveal.patterns.dynamic import DynamicPattern

__all__ = ["allowed_pairs", "solve_knob"]


def allowed_pairs(p) -> float:
    """Allowed (query, key) pairs; for a content-selected pattern, as selected on random q and k."""
    if isinstance(p, DynamicPattern):
        gen = torch.Generator().manual_seed(0)
        q, k = (torch.randn(1, 4, p.n, 16, generator=gen) for _ in range(2))
        return p.select(q, k).density().mean().item() * p.n * p.n
    return p.density() * p.n_q * p.n_kv


def solve_knob(density: Callable[[int], float | None], target: float, lo: int, hi: int, *, monotone: bool = True):
    """``(knob, density)``: the integer in ``[lo, hi]`` whose ``density(knob)`` is nearest ``target``.

    ``monotone``: ``density`` does not decrease with the knob; solved by bisection. Otherwise
    every knob of a geometric grid (×1.25) is tried, then every integer between the best
    one's neighbours; ``density`` may return None for a knob that gives no valid pattern.
    """
    if monotone:
        return _bisect(density, target, lo, hi)
    best = (None, None, math.inf)
    grid, k = [], lo
    while k <= hi:
        grid.append(k)
        k = max(k + 1, int(k * 1.25))

    def consider(knobs, best):
        for kk in knobs:
            d = density(kk)
            if d is not None and abs(d - target) < best[2]:
                best = (kk, d, abs(d - target))
        return best

    best = consider(grid, best)
    if best[0] is None:
        raise ValueError(f"no knob in [{lo}, {hi}] gives a valid pattern")
    i = grid.index(best[0])
    best = consider(range(grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)] + 1), best)
    return best[0], best[1]


def _bisect(density, target, lo, hi):
    d_lo = density(lo)
    if d_lo >= target or lo == hi:
        return lo, d_lo
    d_hi = density(hi)
    if d_hi <= target:
        return hi, d_hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        d = density(mid)
        if d < target:
            lo, d_lo = mid, d
        else:
            hi, d_hi = mid, d
    return (lo, d_lo) if target - d_lo <= d_hi - target else (hi, d_hi)
