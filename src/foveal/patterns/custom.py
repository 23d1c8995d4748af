"""A user-defined pattern from an elementwise mask function (attention-gym style)."""

from __future__ import annotations

from foveal._checks import as_shape, fmt_axes
from foveal.patterns.base import Pattern

__all__ = ["MaskPattern"]


class MaskPattern(Pattern):
    """A pattern given by ``fn(q_idx, kv_idx) -> bool tensor`` on ``n`` tokens (an int or a grid).

    Its layout and density are derived by evaluating ``fn`` tile by tile in bounded
    chunks: O(N²) work but bounded memory. Prefer a built-in pattern (or a union of
    them) where one fits; their layouts are analytic.
    """

    def __init__(self, n, fn, name: str | None = None, n_kv=None):
        if not callable(fn):
            raise TypeError(f"fn must be callable (q_idx, kv_idx) -> bool tensor, got {type(fn).__name__}")
        self._set(shape=as_shape("n", n), fn=fn, name=name or getattr(fn, "__name__", "fn"))
        if n_kv is not None and as_shape("n_kv", n_kv) != self.shape:
            self._set(_kv_shape=as_shape("n_kv", n_kv))

    def mask(self, q_idx, kv_idx):
        return self.fn(q_idx, kv_idx)

    def _key(self):
        return (self.shape, self.kv_shape, self.fn)

    def __repr__(self):
        kv = "" if self.kv_shape == self.shape else f", n_kv={fmt_axes(self.kv_shape)}"
        return f"MaskPattern(n={fmt_axes(self.shape)}{kv}, fn={self.name}) [layout: {self.layout_method}]"
