"""Patterns defined on the flat token index: full, causal, global tokens, sinks, strided.

``n`` may be an int (a sequence) or a grid tuple; the rule always reads the flat
row-major token index, so ``Causal((16, 16))`` is raster-order causal.

Also here: ``is_causal(pattern)``, the exact test that no query sees a later key
(decoding needs it), and the argument check shared by every ``visible_later``.
"""

from __future__ import annotations

import torch

from foveal._checks import as_shape, fmt_axes, positive_int
from foveal.cache import LRU
from foveal.patterns.base import Pattern, ProgressionPattern

__all__ = ["Full", "Causal", "GlobalTokens", "Sinks", "Strided", "FlatPattern", "is_causal"]


def _like(x: torch.Tensor, value) -> torch.Tensor:
    return torch.zeros_like(x) + value


def visible_later_args(pattern: Pattern, key_pos, t):
    """Checked arguments of ``pattern.visible_later``: (int64 key positions in ``[0, n_kv)``, int ``t >= 0``)."""
    if not isinstance(key_pos, torch.Tensor) or key_pos.dtype == torch.bool or key_pos.is_floating_point() \
            or key_pos.is_complex():
        got = key_pos.dtype if isinstance(key_pos, torch.Tensor) else type(key_pos).__name__
        raise TypeError(f"key_pos must be an integer tensor of key positions, got {got}")
    t = positive_int("t", t, minimum=0)
    key_pos = key_pos.long()
    if key_pos.numel() and (int(key_pos.min()) < 0 or int(key_pos.max()) >= pattern.n_kv):
        raise ValueError(
            f"key_pos must hold key positions in [0, {pattern.n_kv}) of {pattern!r}, got values in "
            f"[{int(key_pos.min())}, {int(key_pos.max())}]"
        )
    return key_pos, t


def _none(key_pos: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(key_pos, dtype=torch.bool)


def _all(key_pos: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(key_pos, dtype=torch.bool)


class FlatPattern(ProgressionPattern):
    """A pattern whose rule reads the flat token index: it factorises over ``(n,)``."""

    def _init_shape(self, n, n_kv=None):
        shape = as_shape("n", n)
        self._set(shape=shape, axes_shape=(self._prod(shape),))
        if n_kv is not None:
            kv_shape = as_shape("n_kv", n_kv)
            if kv_shape != shape:
                self._set(_kv_shape=kv_shape, _kv_axes_shape=(self._prod(kv_shape),))

    @property
    def offset(self) -> int:
        """``n_kv − n_q``: query ``i`` sits at key position ``i + offset`` (bottom-right alignment)."""
        return self.n_kv - self.n_q

    @staticmethod
    def _prod(shape):
        out = 1
        for s in shape:
            out *= s
        return out

    def _token_count(self, name: str, value) -> int:
        """A number of leading keys: a positive int no larger than the key count."""
        value = positive_int(name, value)
        if value > self.n_kv:
            raise ValueError(f"{name} must be <= the number of tokens {self.n_kv}, got {value}")
        return value

    def _n_repr(self) -> str:
        kv = "" if self.kv_shape == self.shape else f", n_kv={fmt_axes(self.kv_shape)}"
        return f"n={fmt_axes(self.shape)}{kv}"


class Full(FlatPattern):
    """Every query attends to every key (``n_kv`` keys, default ``n``)."""

    def __init__(self, n, n_kv=None):
        self._init_shape(n, n_kv)

    def progression(self, axis, x):
        return _like(x, 0), _like(x, 1), _like(x, self.n_kv)

    def visible_later(self, key_pos, t):
        key_pos, t = visible_later_args(self, key_pos, t)
        return _all(key_pos) if t < self.n_q else _none(key_pos)

    def _kept_keys_seen(self):
        return True

    def _sees_itself(self):
        return self.n_q == self.n_kv

    def _key(self):
        return (self.shape, self.kv_shape)

    def __repr__(self):
        return f"Full({self._n_repr()})"


class Causal(FlatPattern):
    """Query ``i`` attends to keys ``j <= i + n_kv − n_q`` (flat row-major order on a grid).

    With ``n_kv`` keys (default ``n``) the mask is aligned bottom-right, as in
    FlashAttention: the last query sees every key; with fewer keys than queries the
    first ``n_q − n_kv`` queries see none (zero output).
    """

    def __init__(self, n, n_kv=None):
        self._init_shape(n, n_kv)

    def progression(self, axis, x):
        return _like(x, 0), _like(x, 1), torch.clamp(x + self.offset + 1, 0, self.n_kv)

    def visible_later(self, key_pos, t):
        # the last query sees every key
        key_pos, t = visible_later_args(self, key_pos, t)
        return _all(key_pos) if t < self.n_q else _none(key_pos)

    def _kept_keys_seen(self):
        return True

    def _sees_itself(self):
        return self.n_q == self.n_kv

    def _key(self):
        return (self.shape, self.kv_shape)

    def __repr__(self):
        return f"Causal({self._n_repr()})"


class GlobalTokens(FlatPattern):
    """The first ``count`` tokens attend to everything and everything attends to them.

    Longformer / BigBird global tokens. Combine with a local pattern by ``|``.
    """

    def __init__(self, n, count: int, n_kv=None):
        self._init_shape(n, n_kv)
        self._set(count=self._token_count("count", count))

    def progression(self, axis, x):
        return _like(x, 0), _like(x, 1), torch.where(x < self.count, self.n_kv, self.count)

    def visible_later(self, key_pos, t):
        key_pos, t = visible_later_args(self, key_pos, t)
        if t >= self.n_q:
            return _none(key_pos)
        return _all(key_pos) if t < self.count else key_pos < self.count

    def _key(self):
        return (self.shape, self.kv_shape, self.count)

    def __repr__(self):
        return f"GlobalTokens({self._n_repr()}, count={self.count})"


class Sinks(FlatPattern):
    """Attention sinks: key ``j`` is visible to query ``i`` iff ``j < count`` and ``j <= i + n_kv − n_q``.

    The first ``count`` tokens, causally (aligned bottom-right as ``Causal``): a sink
    is an early token, never a future one, so query 0 sees only key 0. Combine with
    ``SlidingWindow`` by ``|`` for StreamingLLM's pattern. Xiao et al., "Efficient
    Streaming Language Models with Attention Sinks" (2024); FlashAttention's sinks.
    """

    def __init__(self, n, count: int, n_kv=None):
        self._init_shape(n, n_kv)
        self._set(count=self._token_count("count", count))

    def progression(self, axis, x):
        return _like(x, 0), _like(x, 1), torch.clamp(x + self.offset + 1, 0, self.count)

    def visible_later(self, key_pos, t):
        # the last query sees every sink
        key_pos, t = visible_later_args(self, key_pos, t)
        return key_pos < self.count if t < self.n_q else _none(key_pos)

    def _kept_keys_seen(self):
        return self.n_q == self.n_kv  # a sink j <= t is seen by every query from j on

    def _key(self):
        return (self.shape, self.kv_shape, self.count)

    def __repr__(self):
        return f"Sinks({self._n_repr()}, count={self.count})"


class Strided(FlatPattern):
    """Keys ``j`` with ``(i - j) % stride == 0`` (Sparse Transformer's strided pattern).

    Non-causal as defined; intersect with ``Causal`` for the autoregressive form.
    """

    def __init__(self, n, stride: int):
        self._init_shape(n)
        stride = positive_int("stride", stride)
        if stride > self.n:
            raise ValueError(f"stride must be <= the number of tokens {self.n}, got {stride}")
        self._set(stride=stride)

    def progression(self, axis, x):
        first = x % self.stride
        return first, _like(x, self.stride), (self.n - 1 - first) // self.stride + 1

    def visible_later(self, key_pos, t):
        # the first query i >= t with i ≡ j (mod stride) must exist
        key_pos, t = visible_later_args(self, key_pos, t)
        return t + (key_pos - t) % self.stride < self.n

    def _key(self):
        return (self.shape, self.stride)

    def __repr__(self):
        return f"Strided({self._n_repr()}, stride={self.stride})"


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
    from foveal.patterns.algebra import Intersection, Union

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
