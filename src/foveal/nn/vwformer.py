"""Varying window attention (VWA) and the VWFormer multi-scale module.

Yan, Wu and Zhang, "Multi-Scale Representations by Varying Window Attention for
Semantic Segmentation" (ICLR 2024).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from foveal._checks import positive_int
from foveal.nn._common import (
    attend,
    cached_pattern,
    check_backend,
    check_bool,
    check_channels_last,
    check_heads,
    check_probability,
)
from foveal.patterns import Window

__all__ = ["VaryingWindowAttention", "VWABranch", "copy_shift_index", "fold_context"]


def copy_shift_index(length: int, window: int, ratio: int, device=None) -> torch.Tensor:
    """Source coordinate of every folded context entry along one axis: int64 ``(length, ratio)``, −1 = zero.

    VWFormer's copy-shift padding (CSP) on an axis of ``length = n · window``: the
    context window of query window ``i`` is ``ratio · window`` long and centred on it;
    beyond the borders it reads a copy of an interior strip shifted by
    ``(ratio + 1) · window // 2`` instead of zeros (when ``ratio · window`` exceeds the
    axis, the axis is first zero-padded to that length, centred). The context is then
    folded: its entry ``u = t · ratio + r`` becomes sub-position ``r`` of token ``t``.
    Row ``x = i · window + t`` lists the sources of token ``t`` of window ``i``.
    """
    p, r = window, ratio
    span = r * p
    width = max(length, span)  # the zero-padded axis when the context is longer than the axis
    pad = (width - length) // 2
    shift = (r + 1) * p // 2
    left = span - shift  # length of the copied strip on each side
    x = torch.arange(length, device=device)
    u = (x % p)[:, None] * r + torch.arange(r, device=device)  # offset inside the context window
    pos = (x // p)[:, None] * p + u  # coordinate on the CSP-padded axis
    z = torch.where(
        pos < left,
        shift + pos,
        torch.where(pos < left + length, pad + pos - left, width - span + pos - left - length),
    )
    src = z - pad
    return torch.where((src >= 0) & (src < length), src, torch.full_like(src, -1))


def fold_context(ctx: torch.Tensor, window, ratio: int) -> torch.Tensor:
    """Context windows of a (B, H, W, c) map, copy-shift padded and folded: (B, H, W, ratio²·c).

    The tokens of query window ``(i, j)`` of size ``window`` read the ``ratio``-times
    larger context window centred on it, its ``ratio × ratio`` sub-blocks folded into
    channels in ``(row, column, channel)`` order (VWFormer's ``(rh rw c)``). The result
    has the size of the input times ``ratio²`` channels: every query window sees exactly
    as many context tokens as it has queries.
    """
    b, h, w, c = ctx.shape
    rows = copy_shift_index(h, window[0], ratio, ctx.device)  # (H, R)
    cols = copy_shift_index(w, window[1], ratio, ctx.device)  # (W, R)
    padded = F.pad(ctx, (0, 0, 0, 1, 0, 1))  # a zero row and column at index -1
    rows = torch.where(rows < 0, h, rows)
    cols = torch.where(cols < 0, w, cols)
    out = padded[:, rows][:, :, :, cols]  # (B, H, R, W, R, c)
    return out.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, ratio * ratio * c)


class _ChannelsLast(nn.Module):
    """Apply a channels-first layer (a BatchNorm2d) to a channels-last tensor."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _norm(norm_layer, dim):
    return nn.Identity() if norm_layer is None else _ChannelsLast(norm_layer(dim))


def _act(act_layer):
    return nn.Identity() if act_layer is None else act_layer()


def _linear_norm_act(dim_in, dim_out, norm_layer, act_layer):
    """A 1×1 ConvModule (conv, norm, activation) on channels-last tensors; no bias before a norm."""
    linear = nn.Linear(dim_in, dim_out, bias=norm_layer is None)
    return nn.Sequential(linear, _norm(norm_layer, dim_out), _act(act_layer))


class VWABranch(nn.Module):
    """One VWA ratio: queries of each window attend to the pooled context window ``ratio`` times larger.

    The context is first reduced by DOPE — a stride-1 ``ratio × ratio`` convolution
    (zero-padded ``ratio//2 − 1`` before and ``ratio//2`` after for even ratios) from
    ``dim`` to ``dim / ratio²`` channels, then norm and activation — then copy-shift
    padded and folded (``fold_context``) so that window ``i`` of the folded map holds
    the ``window``-sized pooled context of query window ``i``. Attention is then plain
    window attention between the query map and the folded map: ``attend`` with
    ``Window(grid, window)`` (query window ``i`` sees exactly key window ``i``), exact
    and with memory of the size of the input. Queries ``theta``, keys ``phi`` and
    values ``g`` are linear maps (mmcv NonLocal2d's 1×1 convolutions), softmax scale
    ``head_dim ** -0.5``; ``conv_out`` (linear + norm) maps back.

    Shapes: ``x`` (B, H, W, dim) and ``pattern`` ``Window((H, W), window)`` → (B, H, W, dim).

    Yan, Wu and Zhang, "Multi-Scale Representations by Varying Window Attention for
    Semantic Segmentation" (ICLR 2024). Parameters: ``dim`` (divisible by ``ratio²`` and
    ``num_heads``), ``num_heads``, ``ratio`` ``R``, ``norm_layer`` (channels-first class or
    None), ``act_layer``, ``backend`` for ``attend``.
    """

    def __init__(self, dim, num_heads, ratio, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU, backend="auto"):
        super().__init__()
        dim, num_heads = check_heads(dim, num_heads)
        self.ratio = positive_int("ratio", ratio)
        if dim % (ratio * ratio):
            raise ValueError(
                f"dim must be divisible by ratio² (DOPE reduces dim by ratio²), got dim={dim}, ratio={ratio}"
            )
        self.num_heads, self.backend = num_heads, check_backend(backend)
        self.dope = nn.Conv2d(dim, dim // (ratio * ratio), ratio, bias=norm_layer is None)
        self.dope_norm = _norm(norm_layer, dim // (ratio * ratio))
        self.dope_act = _act(act_layer)
        self.theta = nn.Linear(dim, dim)
        self.phi = nn.Linear(dim, dim)
        self.g = nn.Linear(dim, dim)
        self.conv_out = nn.Linear(dim, dim, bias=norm_layer is None)
        self.out_norm = _norm(norm_layer, dim)

    def dope_scaling(self, x: torch.Tensor) -> torch.Tensor:
        r = self.ratio
        before, after = (r // 2 - 1, r // 2) if r % 2 == 0 else (r // 2, r // 2)
        y = F.pad(x.permute(0, 3, 1, 2), (before, after, before, after))
        return self.dope_act(self.dope_norm(self.dope(y).permute(0, 2, 3, 1)))

    def forward(self, x: torch.Tensor, pattern: Window) -> torch.Tensor:
        """``x``: (B, H, W, dim); ``pattern``: ``Window((H, W), window)``. Returns (B, H, W, dim)."""
        b, h, w, c = x.shape
        window = pattern.window
        heads = self.num_heads
        context = fold_context(self.dope_scaling(x), window, self.ratio)
        q = self.theta(x).reshape(b, h * w, heads, -1).transpose(1, 2)
        k = self.phi(context).reshape(b, h * w, heads, -1).transpose(1, 2)
        v = self.g(context).reshape(b, h * w, heads, -1).transpose(1, 2)
        out = attend(q, k, v, pattern, backend=self.backend)
        return self.out_norm(self.conv_out(out.transpose(1, 2).reshape(b, h, w, c)))


class VaryingWindowAttention(nn.Module):
    """VWFormer's multi-scale module: varying window attention at several ratios, a short path and a pooled path.

    The map is cut into query windows (a fixed ``num_windows × num_windows`` set, as in
    the paper, or a fixed ``window_size``); for each ratio ``R`` (2, 4, 8) a
    ``VWABranch`` lets every window attend to its context window ``R`` times larger,
    pre-scaled to the window's own size (DOPE + copy-shift padding), so each branch
    costs what plain window attention costs. The outputs of the short path (linear +
    norm + activation), the global pooled path (mean, linear + norm + activation,
    broadcast) and the branches (each ``+ x`` when ``short_cut``) are concatenated and
    fused by a linear layer + norm + activation, as in the VWFormer head.

    Shapes: ``x`` (B, H, W, dim) → (B, H, W, dim); the window must divide (H, W).

    Yan, Wu and Zhang, "Multi-Scale Representations by Varying Window Attention for
    Semantic Segmentation" (ICLR 2024). Parameters: ``dim`` channels (divisible by
    ``R²`` for every ratio and by ``num_heads``); ``num_heads`` heads of every branch;
    ``window_size`` a fixed query window (int or pair), or None for ``num_windows``
    windows per axis (8, the paper's); ``ratios`` the context ratios; ``short_cut``
    adds the input to every branch output (the reference's option, off by default);
    ``norm_layer`` a channels-first norm class (BatchNorm2d, as the reference's
    ConvModules; None for none) and ``act_layer`` (ReLU); ``proj_drop`` dropout after the
    fusion; ``backend`` for ``attend``. The reference zero-initialises each branch's
    output norm (mmcv NonLocal2d); this module keeps the default initialisation.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size=None,
        ratios=(2, 4, 8),
        num_windows: int = 8,
        short_cut: bool = False,
        norm_layer=nn.BatchNorm2d,
        act_layer=nn.ReLU,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.dim, self.num_heads = check_heads(dim, num_heads)
        backend = check_backend(backend)
        proj_drop = check_probability("proj_drop", proj_drop)
        if isinstance(ratios, numbers.Integral) or not len(ratios):
            raise TypeError(f"ratios must be a non-empty sequence of ints, got {ratios!r}")
        self.ratios = tuple(positive_int(f"ratios[{i}]", r) for i, r in enumerate(ratios))
        for r in self.ratios:
            if dim % (r * r):
                raise ValueError(f"dim must be divisible by R² for every ratio R, got dim={dim} and ratio {r}")
        if window_size is None:
            self.window_size = None
        elif isinstance(window_size, numbers.Integral):
            self.window_size = (positive_int("window_size", window_size),) * 2
        else:
            self.window_size = tuple(positive_int(f"window_size[{a}]", v) for a, v in enumerate(window_size))
            if len(self.window_size) != 2:
                raise ValueError(f"window_size must be an int or a pair, got {window_size!r}")
        self.num_windows = positive_int("num_windows", num_windows)
        self.short_cut = check_bool("short_cut", short_cut)
        self.short_path = _linear_norm_act(dim, dim, norm_layer, act_layer)
        self.image_pool = _linear_norm_act(dim, dim, norm_layer, act_layer)
        self.branches = nn.ModuleList(
            VWABranch(dim, num_heads, r, norm_layer, act_layer, backend) for r in self.ratios
        )
        width = dim * (2 + len(self.ratios))
        self.fuse = _linear_norm_act(width, dim, norm_layer, act_layer)
        self.proj_drop = nn.Dropout(proj_drop)

    def window(self, grid) -> tuple[int, int]:
        """The query window on ``grid`` (checked to divide it)."""
        h, w = grid
        if self.window_size is not None:
            ph, pw = self.window_size
            if h % ph or w % pw:
                raise ValueError(f"window_size {self.window_size} must divide the grid, got grid {(h, w)}")
            return ph, pw
        n = self.num_windows
        if h % n or w % n:
            raise ValueError(f"the grid must be divisible by num_windows={n} on both axes, got grid {(h, w)}")
        return h // n, w // n

    def pattern(self, grid) -> Window:
        """The pattern of every branch on ``grid``: query window i attends to key window i of the folded context."""
        grid = tuple(int(g) for g in grid)
        return cached_pattern(Window, grid, self.window(grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__)
        b, h, w, c = x.shape
        pattern = self.pattern((h, w))
        outs = [self.short_path(x), self.image_pool(x.mean((1, 2), keepdim=True)).expand(b, h, w, c)]
        for branch in self.branches:
            y = branch(x, pattern)
            outs.append(y + x if self.short_cut else y)
        return self.proj_drop(self.fuse(torch.cat(outs, dim=-1)))

    def extra_repr(self) -> str:
        win = f"window_size={self.window_size}" if self.window_size else f"num_windows={self.num_windows}"
        return f"dim={self.dim}, num_heads={self.num_heads}, {win}, ratios={self.ratios}, short_cut={self.short_cut}"
