"""Swin window attention (W-MSA) and shifted window attention (SW-MSA) as one module over ``attend``.

Swin computes shifted windows by rolling the feature map by ``-shift``, partitioning it
into windows, masking the pairs that the roll brought together (its "region mask") and
rolling back. Here the same groups are a ``Window(grid, window, shift)`` pattern in the
original token order, so nothing is rolled, partitioned or masked by hand. Within a
group the offset between two tokens in rolled coordinates equals their offset in
original coordinates, so Swin's relative-position table applies unchanged.
Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(ICCV 2021).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from foveal._checks import per_axis
from foveal.bias import RelativePositionBias
from foveal.nn._common import (
    attend,
    cached_pattern,
    check_backend,
    check_bool,
    check_channels_last,
    check_heads,
    check_no_attn_drop,
    init_attention,
    overridden_pattern,
)
from foveal.patterns.base import Pattern
from foveal.patterns.local import Window

__all__ = ["WindowAttention", "swin_table_bias", "attend_channels_last"]


def swin_table_bias(
    table: torch.Tensor, window: tuple[int, ...], grid: tuple[int, ...], step=1
) -> RelativePositionBias:
    """A Swin/timm relative-position table as a ``foveal.bias.RelativePositionBias`` on ``grid``.

    ``table`` has Swin's layout ``(prod(2·window − 1), heads)``, rows in row-major
    order of the offset *query − key* (Swin's ``relative_position_index``);
    ``RelativePositionBias`` counts offsets *key − query*, hence the flip. ``step``
    measures offsets in units of ``step`` grid cells (MaxViT's grid attention).
    Differentiable: gradients reach ``table``.
    """
    sizes = tuple(2 * w - 1 for w in window)
    heads = table.shape[-1]
    t = table.t().reshape(heads, *sizes).flip(tuple(range(1, len(sizes) + 1)))
    return RelativePositionBias(grid, tuple(w - 1 for w in window), t, step=step)


def attend_channels_last(
    x: torch.Tensor,
    qkv: nn.Linear,
    proj: nn.Linear,
    num_heads: int,
    pattern: Pattern,
    *,
    bias=None,
    scale: float | None = None,
    backend: str = "auto",
    head_first: bool = False,
) -> torch.Tensor:
    """Multi-head self-attention of ``x`` (B, *grid, C) over ``pattern``: ``proj(attend(qkv(x)))``, same shape.

    The ``qkv`` output channels are laid out ``(3, heads, head_dim)`` (Swin, timm's
    ``head_first=False``) or, with ``head_first``, ``(heads, 3, head_dim)`` (timm's MaxViT
    ``*_rw`` models: each head's q, k and v side by side).
    """
    b, *grid, c = x.shape
    head_dim = qkv.out_features // (3 * num_heads)
    if head_first:
        q, k, v = qkv(x).reshape(b, -1, num_heads, 3, head_dim).permute(3, 0, 2, 1, 4)
    else:
        q, k, v = qkv(x).reshape(b, -1, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    out = attend(q, k, v, pattern, bias=bias, scale=scale, backend=backend)
    return proj(out.transpose(1, 2).reshape(b, *grid, num_heads * head_dim))


class _TableAttention(nn.Module):
    """Shared parts of ``WindowAttention`` and MaxViT's ``MultiAxisAttention`` (not used alone).

    timm's fused ``qkv`` and ``proj`` (+ ``proj_drop``) around ``attend``, and a learned
    relative-position table in Swin's layout ``(prod(2·window − 1), num_heads)`` turned
    into a bias on the grid (``swin_table_bias``).
    """

    def _init_attention(self, dim, num_heads, window, qkv_bias, qk_scale, proj_drop, rel_pos_bias) -> None:
        init_attention(self, dim, num_heads, qkv_bias, qk_scale, proj_drop, self.backend)
        if check_bool("rel_pos_bias", rel_pos_bias):
            rows = math.prod(2 * w - 1 for w in window)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.register_parameter("relative_position_bias_table", None)

    def _attend(self, x: torch.Tensor, pattern: Pattern, window, step=1) -> torch.Tensor:
        """``proj_drop(proj(attend(qkv(x))))`` over ``pattern``, with the table's bias when there is one."""
        bias = None
        if self.relative_position_bias_table is not None:
            bias = swin_table_bias(self.relative_position_bias_table, window, tuple(x.shape[1:-1]), step=step)
        out = attend_channels_last(
            x, self.qkv, self.proj, self.num_heads, pattern, bias=bias, scale=self.scale, backend=self.backend
        )
        return self.proj_drop(out)


class WindowAttention(_TableAttention):
    """Swin's (shifted) window attention with its relative-position bias, on channels-last grids.

    Each token attends to the tokens of its window (``shift_size = 0``, W-MSA) or of
    its shifted window (``shift_size > 0``, SW-MSA, the exact groups of Swin's roll +
    region mask) with softmax attention plus a learned per-head bias indexed by the
    relative position within the window.

    Shapes: ``x`` is (batch, *grid, dim), channels last, with 2 grid axes (``window_size``
    an int or a pair) or as many as ``window_size`` has entries (1-D and 3-D too); every
    grid axis must be divisible by the window. Returns the same shape.

    Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
    Windows" (ICCV 2021). The state dict matches timm's ``WindowAttention``
    (``qkv``, ``proj``, ``relative_position_bias_table`` of shape
    ``((2·Wh−1)(2Ww−1), num_heads)``), so timm/Swin weights load; a stored
    ``relative_position_index`` buffer is accepted and ignored (it is a constant).
    Unlike timm's module, which takes pre-partitioned windows and a mask, this one
    takes the whole feature map and does the shift itself; Swin's ``-100`` region mask
    becomes exact exclusion (a difference below ``e^-90`` in the weights).

    Parameters:
        dim: channels (``embed_dim``).
        num_heads: attention heads; ``dim`` must be divisible by it.
        window_size: window per axis (int: a 2-D square window).
        shift_size: Swin's shift per axis, ``0 <= shift_size < window_size`` (Swin uses
            ``window_size // 2`` in every other block).
        rel_pos_bias: learn Swin's relative-position bias table.
        qkv_bias: bias in the qkv projection.
        qk_scale: score scale, default ``head_dim ** -0.5``.
        attn_drop: must be 0.0 (no dropout on attention weights in ``attend``).
        proj_drop: dropout after the output projection.
        backend: ``attend`` backend, ``"auto"`` by default.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size=7,
        shift_size=0,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        dim, num_heads = check_heads(dim, num_heads)
        if isinstance(window_size, bool) or not isinstance(window_size, (numbers.Integral, tuple, list)):
            raise TypeError(f"window_size must be an int or a tuple of 1 to 3 ints, got {window_size!r}")
        nd = 2 if isinstance(window_size, numbers.Integral) else len(window_size)
        if not 1 <= nd <= 3:
            raise ValueError(
                f"window_size must be an int (2-D) or a tuple of 1 to 3 ints (one per grid axis), got {window_size!r}"
            )
        self.window_size = per_axis("window_size", window_size, nd)
        self.shift_size = per_axis("shift_size", shift_size, nd, minimum=0)
        for a, (s, w) in enumerate(zip(self.shift_size, self.window_size)):
            if s >= w:
                raise ValueError(
                    f"shift_size must be in [0, window_size) on every axis; "
                    f"shift_size[{a}]={s} is not < window_size[{a}]={w}"
                )
        check_no_attn_drop(attn_drop)
        self.backend = check_backend(backend)
        self._init_attention(dim, num_heads, self.window_size, qkv_bias, qk_scale, proj_drop, rel_pos_bias)

    def pattern(self, grid) -> Window:
        """The ``Window`` pattern (shifted when ``shift_size > 0``) this module uses on ``grid``.

        A ``pattern_override`` (``foveal.nn._common.set_pattern_override``) replaces it.
        """
        grid = tuple(int(g) for g in grid)
        swapped = overridden_pattern(self, grid)
        if swapped is not None:
            return swapped
        return cached_pattern(Window, grid, self.window_size, shift=self.shift_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, *grid, dim), channels last; returns the same shape."""
        nd = len(self.window_size)
        check_channels_last(x, self.dim, type(self).__name__, nd + 2, f"(batch, {nd} grid axes, dim)")
        return self._attend(x, self.pattern(x.shape[1:-1]), self.window_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # timm (and the original Swin) store the constant index as a buffer; it is not needed here
        state_dict.pop(prefix + "relative_position_index", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
            f"shift_size={self.shift_size}, rel_pos_bias={self.relative_position_bias_table is not None}"
        )
