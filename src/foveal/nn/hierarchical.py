"""Scale-DiT hierarchical local attention: windows along a Hilbert curve plus a low-resolution global latent.

Zhang and Tai, "Scale-DiT: Ultra-High-Resolution Image Generation with Hierarchical
Local Attention" (2025). No official code; written from the paper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from foveal._checks import positive_int
from foveal.merge import merge_attentions
from foveal.nn._common import attend, cached_pattern, check_channels_last, check_input, init_attention
from foveal.patterns import Full, Halo, Window
from foveal.patterns.order import ORDERS, Ordered

__all__ = ["HierarchicalLocalAttention"]


def _local_pattern(grid: tuple[int, ...], tokens: int, order: str) -> Ordered:
    """Windows of ``tokens`` consecutive tokens along ``order`` over ``grid`` (a shorter last window)."""
    n = math.prod(grid)
    inner = Window((n,), tokens) if n % tokens == 0 else Halo((n,), tokens, 0)
    return Ordered(inner, order, grid)


class HierarchicalLocalAttention(nn.Module):
    """Scale-DiT's hierarchical local attention over a 2-D grid of high-resolution tokens.

    Each high-resolution token attends, in one softmax, to the ``window_size²`` tokens of
    its window — a run of consecutive tokens along a Hilbert curve over the grid, which
    on a ``2^n × 2^n`` grid is an aligned ``window_size × window_size`` square when
    ``window_size`` is a power of two — and to every token of a low-resolution latent
    (global guidance). The latent is the input average-pooled by ``pool`` per axis, or,
    as in the paper, a separate low-resolution stream ``low`` passed to ``forward``;
    then the latent's tokens also attend to each other (fully, and not to the
    high-resolution tokens: *(choose)*, the paper's low-resolution path runs like the
    base model) and the module returns both streams.

    Shapes: ``x`` (B, H, W, dim), channels last; ``low`` (B, h, w, dim) or None.
    Returns (B, H, W, dim), or ``(out, out_low)`` when ``low`` is given.

    Zhang and Tai, "Scale-DiT: Ultra-High-Resolution Image Generation with Hierarchical
    Local Attention" (2025).

    Parameters: ``dim`` channels; ``num_heads`` (divides ``dim``); ``window_size`` the
    side ``l`` of a local window (``l²`` consecutive tokens in the order; a last, shorter
    window when ``l²`` does not divide ``H·W``); ``pool`` the pooling factor of the
    latent made from ``x`` (divides ``H`` and ``W``; None: no latent unless ``low`` is
    given); ``order`` ``"hilbert"`` (the paper), ``"morton"`` or ``"raster"``;
    ``qkv_bias``; ``qk_scale`` (default ``head_dim**-0.5``); ``proj_drop``; ``backend``
    for ``foveal.attend``. The window and latent attentions are combined by
    ``foveal.merge_attentions`` from their log-sum-exps: one softmax over both key sets.
    Positional encodings (the paper's scaled RoPE anchors) are the caller's, as is
    attention dropout (``attend`` has none). On grids that are not
    ``2^n × 2^n`` the Hilbert order follows the enclosing power-of-two curve
    (``foveal.patterns.order.hilbert``), so windows are compact but not squares.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 8,
        pool: int | None = 4,
        order: str = "hilbert",
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.window_size = positive_int("window_size", window_size)
        self.pool = None if pool is None else positive_int("pool", pool)
        if not isinstance(order, str) or order not in ORDERS:
            raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
        self.order = order
        init_attention(self, dim, num_heads, qkv_bias, qk_scale, proj_drop, backend)

    def pattern(self, grid) -> Ordered:
        """The local pattern on ``grid``: windows of ``window_size²`` consecutive tokens in the order.

        The latent's tokens are extra keys every high-resolution query sees; they are
        not part of this pattern.
        """
        grid = tuple(int(g) for g in grid)
        n, w = math.prod(grid), self.window_size**2
        if w > n:
            raise ValueError(
                f"window_size**2 must be <= the number of tokens; window_size={self.window_size} gives {w} "
                f"tokens per window but grid {grid} has {n}"
            )
        return cached_pattern(_local_pattern, grid, w, self.order)

    def _latent_pattern(self, n: int, m: int) -> Full:
        """``n`` queries that see all ``m`` latent keys (shared bounded cache)."""
        return cached_pattern(Full, n, n_kv=m)

    def _heads(self, x):
        b, n, _ = x.shape
        return self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def _check(self, x, low):
        check_channels_last(x, self.dim, type(self).__name__)
        if low is not None:
            check_input("low", low, type(self).__name__)
            if low.dim() != 4 or low.shape[0] != x.shape[0] or low.shape[-1] != self.dim:
                raise ValueError(
                    f"low must be (batch={x.shape[0]}, h, w, dim={self.dim}) or None, got {tuple(low.shape)}"
                )
            if low.dtype != x.dtype or low.device != x.device:
                raise TypeError(
                    f"low must match x in dtype and device ({x.dtype}, {x.device}), got {low.dtype}, {low.device}"
                )
        elif self.pool is not None:
            h, w = x.shape[1:3]
            if h % self.pool or w % self.pool:
                raise ValueError(f"pool must divide the grid; pool={self.pool}, grid ({h}, {w})")

    def forward(self, x: torch.Tensor, low: torch.Tensor | None = None):
        """``x`` (B, H, W, dim); ``low`` (B, h, w, dim) or None. See the class docstring."""
        self._check(x, low)
        b, hh, ww, c = x.shape
        pattern = self.pattern((hh, ww))
        q, k, v = self._heads(x.reshape(b, hh * ww, c))
        latent = low
        if latent is None and self.pool is not None:
            latent = F.avg_pool2d(x.permute(0, 3, 1, 2), self.pool).permute(0, 2, 3, 1)
        if latent is None:
            out = attend(q, k, v, pattern, scale=self.scale, backend=self.backend)
        else:
            m = latent.shape[1] * latent.shape[2]
            ql, kl, vl = self._heads(latent.reshape(b, m, c))
            local = attend(q, k, v, pattern, scale=self.scale, backend=self.backend, return_lse=True)
            everyone = self._latent_pattern(hh * ww, m)
            guide = attend(q, kl, vl, everyone, scale=self.scale, backend=self.backend, return_lse=True)
            out, _ = merge_attentions([local[0], guide[0]], [local[1], guide[1]])
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, hh, ww, c)))
        if low is None:
            return out
        out_low = attend(ql, kl, vl, self._latent_pattern(m, m), scale=self.scale, backend=self.backend)
        out_low = self.proj_drop(self.proj(out_low.transpose(1, 2).reshape(low.shape)))
        return out, out_low

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, pool={self.pool}, "
            f"order={self.order!r}"
        )
