"""Union (``a | b``) and intersection (``a & b``) of patterns.

The mask is the OR / AND of the parts' masks; the layout combines the parts'
layouts block-wise (a union block is full if any part's is; an intersection block is
full only if every part's is), so it stays analytic when the parts are.
"""

from __future__ import annotations

import functools
import math
import operator

import torch

from foveal.patterns.base import Pattern, visible_later_args

__all__ = ["Union", "Intersection"]


def _joint_shape(parts, kv: bool = False) -> tuple[int, ...]:
    """The query (or key) geometry shared by ``parts``: equal token counts, and equal grids where they have one."""
    def shape_of(p):
        return p.kv_shape if kv else p.shape

    what = "keys" if kv else "tokens"
    n = math.prod(shape_of(parts[0]))
    grids = {shape_of(p) for p in parts if len(shape_of(p)) > 1}
    for p in parts[1:]:
        if math.prod(shape_of(p)) != n:
            raise ValueError(
                f"patterns combined with | or & must have the same number of {what}; "
                f"{parts[0]!r} has {n}, {p!r} has {math.prod(shape_of(p))}"
            )
    if len(grids) > 1:
        raise ValueError(f"patterns combined with | or & must share one grid; got grids {sorted(grids)}")
    return grids.pop() if grids else (n,)


class _Combination(Pattern):
    _symbol = "?"
    #: named patterns built as combinations (e.g. ``Dilated`` with one pair) may hold one part
    _min_parts = 2

    def __init__(self, *parts: Pattern):
        flat = []
        for p in parts:
            if not isinstance(p, Pattern):
                raise TypeError(f"can only combine Patterns with {self._symbol}, got {type(p).__name__}")
            flat.extend(p.parts if type(p) is type(self) else (p,))
        if len(flat) < self._min_parts:
            raise ValueError(f"{type(self).__name__} needs at least {self._min_parts} patterns, got {len(flat)}")
        self._set(parts=tuple(flat), shape=_joint_shape(flat))
        kv_shape = _joint_shape(flat, kv=True)
        if kv_shape != self.shape:
            self._set(_kv_shape=kv_shape)
        methods = {p.layout_method for p in flat}
        self._set(layout_method="analytic" if methods == {"analytic"} else "chunked mask evaluation (in part)")

    def _key(self):
        return self.parts

    def _build_layout(self, block_q, block_k):
        layouts = [p.layout(block_q, block_k) for p in self.parts]
        return functools.reduce(self._layout_op, layouts)

    def __repr__(self):
        def show(p):
            return f"({p!r})" if isinstance(p, _Combination) else repr(p)

        return f" {self._symbol} ".join(show(p) for p in self.parts)


class Union(_Combination):
    """Pairs allowed by any part: ``a | b``."""

    _symbol = "|"
    _layout_op = staticmethod(operator.or_)

    def mask(self, q_idx, kv_idx):
        return functools.reduce(operator.or_, (p.mask(q_idx, kv_idx) for p in self.parts))

    def key_set(self, q_tokens):
        return torch.unique(torch.cat([p.key_set(q_tokens) for p in self.parts]))

    def visible_later(self, key_pos, t):
        """Some later query sees the key under some part: the OR of the parts' answers (exact)."""
        return functools.reduce(operator.or_, (p.visible_later(key_pos, t) for p in self.parts))

    def _kept_keys_seen(self):
        return all(p._kept_keys_seen() for p in self.parts)

    def _sees_itself(self):
        return any(p._sees_itself() for p in self.parts)


class Intersection(_Combination):
    """Pairs allowed by every part: ``a & b``."""

    _symbol = "&"
    _layout_op = staticmethod(operator.and_)

    def mask(self, q_idx, kv_idx):
        return functools.reduce(operator.and_, (p.mask(q_idx, kv_idx) for p in self.parts))

    def key_set(self, q_tokens):
        keys = self.parts[0].key_set(q_tokens)
        for p in self.parts[1:]:
            keys = keys[torch.isin(keys, p.key_set(q_tokens))]
        return keys

    def visible_later(self, key_pos, t):
        """Exact: parts that allow every (later query, key) pair are dropped (``Full``; ``Causal`` when every
        key precedes the first later query, as in decoding); one part left answers alone, otherwise the
        mask is evaluated in bounded chunks (an existential does not distribute over AND)."""
        key_pos, t = visible_later_args(self, key_pos, t)
        first = key_pos.numel() == 0 or int(key_pos.max()) <= t + self.n_kv - self.n_q
        rest = [p for p in self.parts if not (p._allows_every_pair or (p._allows_every_causal_pair and first))]
        if len(rest) == 1:
            return rest[0].visible_later(key_pos, t)
        if not rest:
            return torch.full_like(key_pos, t < self.n_q, dtype=torch.bool)
        return super().visible_later(key_pos, t)

    def _kept_keys_seen(self):
        # Causal and Full hold for every key j <= t; one other part decides (an existential over i does not
        # distribute over AND)
        rest = [p for p in self.parts if not p._allows_every_causal_pair]
        return len(rest) <= 1 and all(p._kept_keys_seen() for p in self.parts)

    def _sees_itself(self):
        return all(p._sees_itself() for p in self.parts)


Pattern._union_type, Pattern._intersection_type = Union, Intersection  # what ``|`` and ``&`` build
