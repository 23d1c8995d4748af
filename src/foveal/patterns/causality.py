"""``is_causal(pattern)``: the exact test that no query sees a later key (decoding and integrations need it)."""

from __future__ import annotations

import torch

from foveal.cache import LRU
from foveal.patterns.algebra import Intersection, Union
from foveal.patterns.base import Pattern, ProgressionPattern
from foveal.patterns.global_ import Causal, FlatPattern, Sinks, _like

__all__ = ["is_causal"]


class _Later(FlatPattern):
    """Keys strictly after the query: ``j > i + n_kv − n_q`` (the complement of ``Causal``)."""

    def __init__(self, n, n_kv=None):
        self._init_shape(n, n_kv)

    def progression(self, axis, x):
        first = torch.clamp(x + self.offset + 1, 0, self.n_kv)
        return torch.clamp(first, max=self.n_kv - 1), _like(x, 1), self.n_kv - first

    def _key(self):
        return (self.shape, self.kv_shape)

    def __repr__(self):
        return f"_Later({self._n_repr()})"


_CAUSAL = LRU("causality of patterns", 256)


def is_causal(pattern: Pattern) -> bool:
    """True iff no query ``i`` of ``pattern`` may see a key ``j > i + n_kv − n_q`` (flat row-major order).

    Exact, and cheap for the built-in patterns: a union is causal iff every part is;
    an intersection is if some part is; a pattern of one flat progression is iff
    every query's last key is at most ``i + n_kv − n_q`` (O(n), in chunks). Any other
    pattern is causal iff ``pattern & (j > i + n_kv − n_q)`` allows no pair, counted
    from block layouts (by chunked mask evaluation where the pattern has no analytic
    layout). Cached by the pattern's value.
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a foveal Pattern, got {type(pattern).__name__}")
    if isinstance(pattern, (Causal, Sinks)):
        return True
    return _CAUSAL.get(pattern, lambda: _decide_causal(pattern))


def _decide_causal(pattern: Pattern) -> bool:
    if isinstance(pattern, Union):
        return all(is_causal(p) for p in pattern.parts)
    if isinstance(pattern, Intersection) and any(is_causal(p) for p in pattern.parts):
        return True
    if isinstance(pattern, ProgressionPattern) and len(pattern.axes_shape) == 1 and len(pattern.kv_axes_shape) == 1:
        offset = pattern.n_kv - pattern.n_q
        chunk = 1 << 20
        for s in range(0, pattern.n_q, chunk):
            x = torch.arange(s, min(s + chunk, pattern.n_q))
            first, step, count = (torch.broadcast_to(v, x.shape) for v in pattern.progression(0, x))
            if bool(((count > 0) & (first + step * (count - 1) > x + offset)).any()):
                return False
        return True
    return (pattern & _Later(pattern.shape, pattern.kv_shape)).num_allowed() == 0
