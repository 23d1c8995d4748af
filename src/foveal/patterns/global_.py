"""Patterns defined on the flat token index: full, causal, global tokens, sinks, strided.

``n`` may be an int (a sequence) or a grid tuple; the rule always reads the flat
row-major token index, so ``Causal((16, 16))`` is raster-order causal.
"""

from __future__ import annotations

import torch

from foveal._checks import as_shape, fmt_axes, positive_int
from foveal.patterns.base import ProgressionPattern

__all__ = ["Full", "Causal", "GlobalTokens", "Sinks", "Strided", "FlatPattern"]


def _like(x: torch.Tensor, value) -> torch.Tensor:
    return torch.zeros_like(x) + value


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

    def _key(self):
        return (self.shape, self.kv_shape, self.count)

    def __repr__(self):
        return f"GlobalTokens({self._n_repr()}, count={self.count})"


class Sinks(FlatPattern):
    """Every query may attend to the first ``count`` tokens (StreamingLLM attention sinks).

    Combine with ``SlidingWindow`` by ``|`` for StreamingLLM's pattern.
    """

    def __init__(self, n, count: int, n_kv=None):
        self._init_shape(n, n_kv)
        self._set(count=self._token_count("count", count))

    def progression(self, axis, x):
        return _like(x, 0), _like(x, 1), _like(x, self.count)

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

    def _key(self):
        return (self.shape, self.stride)

    def __repr__(self):
        return f"Strided({self._n_repr()}, stride={self.stride})"
