"""Patterns defined on the flat token index: full, causal, global tokens, sinks, strided.

``n`` may be an int (a sequence) or a grid tuple; the rule always reads the flat
row-major token index, so ``Causal((16, 16))`` is raster-order causal.

``is_causal(pattern)``, the exact test that no query sees a later key, lives in
``foveal.patterns.causality``; the argument check of every ``visible_later`` in
``foveal.patterns.base``.
"""

from __future__ import annotations

import torch

from foveal._checks import as_shape, fmt_axes, positive_int
from foveal.cache import LRU
from foveal.patterns.base import Pattern, ProgressionPattern, visible_later_args

__all__ = ["Full", "Causal", "GlobalTokens", "Sinks", "Strided", "FlatPattern", "visible_later_args"]


def _like(x: torch.Tensor, value) -> torch.Tensor:
    return torch.zeros_like(x) + value


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

    _allows_every_pair = True
    _allows_every_causal_pair = True

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

    _allows_every_causal_pair = True

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
