"""Local patterns: sliding window (flat), and the N-D neighbourhood, window, grid, halo and padded halo.

The N-D patterns act per grid axis and AND over axes; every per-axis parameter takes
an int (all axes) or a tuple (one per axis).
"""

from __future__ import annotations

import math

import torch

from foveal._checks import as_shape, fmt_axes, per_axis, per_axis_bool, positive_int
from foveal.patterns.base import ProgressionPattern
from foveal.patterns.global_ import FlatPattern, _like, visible_later_args

__all__ = ["SlidingWindow", "Neighborhood", "Window", "Grid", "Halo", "PaddedHalo"]


class SlidingWindow(FlatPattern):
    """Keys ``c - left <= j <= c + right`` with ``(c - j) % dilation == 0``, where ``c = i + n_kv − n_q``.

    FlashAttention's ``window_size=(left, right)`` when ``dilation == 1``; Longformer's
    (dilated) sliding window. ``right=0`` (the default) is the causal sliding window.
    With ``n_kv`` keys (default ``n``) the window is aligned bottom-right, as in
    FlashAttention.
    """

    def __init__(self, n, left: int, right: int = 0, dilation: int = 1, n_kv=None):
        self._init_shape(n, n_kv)
        self._set(
            left=positive_int("left", left, minimum=0),
            right=positive_int("right", right, minimum=0),
            dilation=positive_int("dilation", dilation),
        )

    def progression(self, axis, x):
        # keys c - d·m for m in [m_lo, m_hi], inside the window and inside [0, n_kv)
        d, c = self.dilation, x + self.offset
        if d == 1:
            back = torch.clamp(c, max=self.left)
            fwd = torch.clamp(self.n_kv - 1 - c, max=self.right)
        else:
            back = torch.clamp(c // d, max=self.left // d)
            fwd = torch.clamp((self.n_kv - 1 - c) // d, max=self.right // d)
        return c - d * back, _like(x, d), (back + fwd + 1).clamp(min=0)

    def visible_later(self, key_pos, t):
        # a query i >= t sees j iff c = i + n_kv − n_q lies in [j − right, j + left], c ≡ j (mod dilation);
        # c runs over [t + n_kv − n_q, n_kv − 1]: take the smallest admissible c and check the upper bounds
        j, t = visible_later_args(self, key_pos, t)
        lo = torch.clamp(j - self.right, min=t + self.offset)
        c = lo + (j - lo) % self.dilation
        return c <= torch.clamp(j + self.left, max=self.n_kv - 1)

    def _kept_keys_seen(self):
        # causal and contiguous: the queries that see key j are j .. j + left
        return self.n_q == self.n_kv and self.right == 0 and self.dilation == 1

    def _sees_itself(self):
        return self.n_q == self.n_kv

    def _key(self):
        return (self.shape, self.kv_shape, self.left, self.right, self.dilation)

    def __repr__(self):
        extra = "" if self.dilation == 1 else f", dilation={self.dilation}"
        return f"SlidingWindow({self._n_repr()}, left={self.left}, right={self.right}{extra})"


class GridPattern(ProgressionPattern):
    """A pattern on an N-D grid that acts per axis (AND over axes)."""

    def _init_grid(self, grid):
        shape = as_shape("grid", grid)
        self._set(shape=shape, axes_shape=shape)

    def _grid_repr(self) -> str:
        return f"grid={fmt_axes(self.shape)}"

    def _per_axis_divisor(self, name: str, value, context: str = "") -> tuple[int, ...]:
        """``value`` per axis (positive ints), each dividing the grid's length on its axis."""
        values = per_axis(name, value, len(self.shape))
        for a, (length, v) in enumerate(zip(self.shape, values)):
            if length % v:
                raise ValueError(
                    f"{name} must divide the grid on every axis{context}; "
                    f"grid[{a}]={length} is not divisible by {name}[{a}]={v}"
                )
        return values


class Neighborhood(GridPattern):
    """Neighbourhood attention with exactly NATTEN's definition (``na1d``/``na2d``/``na3d``).

    Per axis of length ``L``: a query at ``x`` is in dilation group ``g = x % dilation``
    at ``x' = x // dilation`` of a sub-axis of length ``L_g``; its keys are the same
    group's ``kernel_size`` nearest positions around its stride group's leader (the
    window shifts at the borders so every query has ``kernel_size`` keys), or, with
    ``causal``, the ``x' - max(0, leader - kernel_size + 1) + 1`` positions up to ``x'``.
    Hassani et al., "Neighborhood Attention Transformer" (2023); "Faster Neighborhood
    Attention" (2024); "Generalized Neighborhood Attention" (2025).
    """

    def __init__(self, grid, kernel_size, dilation=1, stride=1, causal=False):
        self._init_grid(grid)
        nd = len(self.shape)
        k = per_axis("kernel_size", kernel_size, nd)
        d = per_axis("dilation", dilation, nd)
        s = per_axis("stride", stride, nd)
        c = per_axis_bool("causal", causal, nd)
        for a, length in enumerate(self.shape):
            if k[a] > length:
                raise ValueError(
                    f"kernel_size must be <= the grid on every axis; kernel_size[{a}]={k[a]} > grid[{a}]={length}"
                )
            if k[a] * d[a] > length:
                raise ValueError(
                    f"kernel_size * dilation must be <= the grid on every axis; on axis {a}: "
                    f"{k[a]} * {d[a]} = {k[a] * d[a]} > grid[{a}]={length}"
                )
            if s[a] > k[a]:
                raise ValueError(f"stride must be <= kernel_size on every axis; stride[{a}]={s[a]} > {k[a]}")
        self._set(kernel_size=k, dilation=d, stride=s, causal=c)

    #: the ``mask`` below is the progressions' mask in fewer operations (tested): plans may use the progressions
    mask_is_progression = True

    def mask(self, q_idx, kv_idx):
        """NATTEN's mask; for the common case (no dilation, stride or causality) in attention-gym's few
        operations per axis — clamp the query to the window's centre, compare the distance — since this
        runs as FlexAttention's ``mask_mod`` on every partial block."""
        if any(d != 1 for d in self.dilation) or any(s != 1 for s in self.stride) or any(self.causal):
            return super().mask(q_idx, kv_idx)
        q_idx = torch.as_tensor(q_idx)
        kv_idx = torch.as_tensor(kv_idx, device=q_idx.device)
        allowed = None
        for axis, (x, y) in enumerate(zip(self._coords(q_idx), self._coords(kv_idx))):
            length, k = self.shape[axis], self.kernel_size[axis]
            left, right = k // 2, k - 1 - k // 2
            centre = x.clamp(left, length - 1 - right)
            ok = (centre - y).abs() <= left if left == right else (y >= centre - left) & (y <= centre + right)
            allowed = ok if allowed is None else allowed & ok
        return allowed

    def progression(self, axis, x):
        length, k = self.shape[axis], self.kernel_size[axis]
        d, s = self.dilation[axis], self.stride[axis]
        g, xp = x % d, x // d
        group_len = (length - g + d - 1) // d
        if self.causal[axis]:
            leader = torch.minimum((xp // s) * s + s - 1, group_len - 1)
            lo = torch.clamp(leader - k + 1, min=0)
            return lo * d + g, _like(x, d), xp - lo + 1
        leader = torch.minimum((xp // s) * s + s // 2, group_len - 1)
        left, right = k // 2, k // 2 + k % 2 - 1
        centre = torch.minimum(torch.clamp(leader, min=left), group_len - 1 - right)
        return (centre - left) * d + g, _like(x, d), _like(x, k)

    def _key(self):
        return (self.shape, self.kernel_size, self.dilation, self.stride, self.causal)

    def __repr__(self):
        parts = [self._grid_repr(), f"kernel_size={fmt_axes(self.kernel_size)}"]
        if any(v != 1 for v in self.dilation):
            parts.append(f"dilation={fmt_axes(self.dilation)}")
        if any(v != 1 for v in self.stride):
            parts.append(f"stride={fmt_axes(self.stride)}")
        if any(self.causal):
            parts.append(f"causal={fmt_axes(self.causal)}")
        return f"Neighborhood({', '.join(parts)})"


class Window(GridPattern):
    """Non-overlapping windows: ``i`` and ``j`` interact iff they fall in the same window on every axis.

    With ``shift = 0`` (the default) the windows are ``x_a // window_a``: Swin's window
    attention (W-MSA), MaxViT's block attention. With ``shift = s`` the windows are
    Swin's shifted windows (SW-MSA) in the original, un-rolled token coordinates:
    rolling by ``-s``, partitioning and applying Swin's region mask is, per axis, the
    groups ``floor((x_a − s_a) / window_a)``: ``[0, s)``, ``[s, s + w)``, …,
    ``[L − w + s, L)``. The grid must be divisible by the window and
    ``0 <= shift < window`` on every axis. Liu et al., "Swin Transformer: Hierarchical
    Vision Transformer using Shifted Windows" (2021).
    """

    def __init__(self, grid, window, shift=0):
        self._init_grid(grid)
        nd = len(self.shape)
        w = self._per_axis_divisor("window", window)
        s = per_axis("shift", shift, nd, minimum=0)
        for a in range(nd):
            if s[a] >= w[a]:
                raise ValueError(
                    f"shift must be in [0, window) on every axis; shift[{a}]={s[a]} is not < window[{a}]={w[a]}"
                )
        self._set(window=w, shift=s)

    def progression(self, axis, x):
        w, s = self.window[axis], self.shift[axis]
        if s == 0:
            return (x // w) * w, _like(x, 1), _like(x, w)
        start = ((x - s) // w) * w + s  # the group's start in un-rolled coordinates, may be < 0
        first = torch.clamp(start, min=0)
        return first, _like(x, 1), torch.clamp(start + w, max=self.shape[axis]) - first

    def _key(self):
        if any(self.shift):
            return (self.shape, self.window, self.shift)
        return (self.shape, self.window)

    def __repr__(self):
        extra = f", shift={fmt_axes(self.shift)}" if any(self.shift) else ""
        return f"Window({self._grid_repr()}, window={fmt_axes(self.window)}{extra})"


class Grid(GridPattern):
    """MaxViT grid attention: coordinates that agree modulo ``grid_a // size_a`` interact on every axis.

    Each group holds ``prod(size)`` tokens spread over the whole grid at stride
    ``grid_a // size_a`` (MaxViT's ``grid_partition``). ``size`` must divide the grid.
    Tu et al., "MaxViT: Multi-Axis Vision Transformer" (2022).
    """

    def __init__(self, grid, size):
        self._init_grid(grid)
        g = self._per_axis_divisor("size", size)
        self._set(size=g)

    def progression(self, axis, x):
        spacing = self.shape[axis] // self.size[axis]
        return x % spacing, _like(x, spacing), _like(x, self.size[axis])

    def as_ordered(self):
        """The same mask as an ``Ordered`` pattern: tokens group by group (MaxViT's ``grid_partition``
        order), then non-overlapping windows of ``prod(size)`` consecutive tokens.

        ``attend`` runs ``Grid`` this way, so kernels see contiguous groups instead of
        keys ``grid // size`` apart (cached on the pattern).
        """
        if "_as_ordered" not in self.__dict__:
            from foveal.patterns.order import Ordered

            nd = len(self.shape)
            spacing = [length // s for length, s in zip(self.shape, self.size)]
            split = [d for s, sp in zip(self.size, spacing) for d in (s, sp)]  # x_a = i_a · spacing_a + r_a
            perm = torch.arange(self.n).reshape(split).permute(*range(1, 2 * nd, 2), *range(0, 2 * nd, 2))
            group = math.prod(self.size)
            self.__dict__["_as_ordered"] = Ordered(Window((self.n,), group), perm.reshape(-1), self.shape)
        return self.__dict__["_as_ordered"]

    def _key(self):
        return (self.shape, self.size)

    def __repr__(self):
        return f"Grid({self._grid_repr()}, size={fmt_axes(self.size)})"


class Halo(GridPattern):
    """HaloNet blocked local attention: a ``block`` tile attends to that tile grown by ``halo``, clipped to the grid.

    Per axis, query ``x`` in tile ``b = x // block`` sees keys in
    ``[b·block − halo, (b+1)·block − 1 + halo]``. The last tile may be smaller when the
    block does not divide the grid. Vaswani et al., "Scaling Local Self-Attention for
    Parameter Efficient Visual Backbones" (2021).
    """

    def __init__(self, grid, block, halo):
        self._init_grid(grid)
        nd = len(self.shape)
        b = per_axis("block", block, nd)
        h = per_axis("halo", halo, nd, minimum=0)
        for a, length in enumerate(self.shape):
            if b[a] > length:
                raise ValueError(f"block must be <= the grid on every axis; block[{a}]={b[a]} > grid[{a}]={length}")
        self._set(block=b, halo=h)

    def progression(self, axis, x):
        length, b, h = self.shape[axis], self.block[axis], self.halo[axis]
        tile = x // b
        lo = torch.clamp(tile * b - h, min=0)
        hi = torch.clamp((tile + 1) * b - 1 + h, max=length - 1)
        return lo, _like(x, 1), hi - lo + 1

    def _key(self):
        return (self.shape, self.block, self.halo)

    def __repr__(self):
        return f"Halo({self._grid_repr()}, block={fmt_axes(self.block)}, halo={fmt_axes(self.halo)})"


class PaddedHalo(GridPattern):
    """Cross pattern of HaloNet with zero-padded borders: queries on ``grid``, keys on the grid padded by ``halo``.

    The keys live on ``grid + 2·halo`` per axis (the input framed by ``halo`` padding
    positions on each side); query ``x`` in tile ``b = x // block`` sees padded key
    coordinates ``[b·block, b·block + block + 2·halo)``, i.e. its tile grown by the halo,
    padding included — every query has ``(block + 2·halo)^dim`` keys, as in timm's
    ``HaloAttn``. ``block`` must divide the grid. Compare ``Halo``, which clips the halo
    at the borders instead. ``kv_offset`` (= ``halo``) is where the query grid sits on
    the key grid: query coordinate ``x`` is key coordinate ``x + halo``.

    ``stride = s`` (timm's strided ``HaloAttn``): the queries are the input subsampled by
    ``s`` (``grid`` is that subsampled grid), the keys the full input (``grid·s + 2·halo``
    per axis); a tile holds ``block / s`` queries per axis and keeps the key window of its
    ``block``-sized input tile. ``s`` must divide ``block``. Vaswani et al., "Scaling Local
    Self-Attention for Parameter Efficient Visual Backbones" (2021).
    """

    def __init__(self, grid, block, halo, stride=1):
        self._init_grid(grid)
        nd = len(self.shape)
        b = per_axis("block", block, nd)
        st = per_axis("stride", stride, nd)
        for a, (bb, ss) in enumerate(zip(b, st)):
            if bb % ss:
                raise ValueError(f"stride must divide block on every axis; block[{a}]={bb} is not divisible by stride[{a}]={ss}")
        self._per_axis_divisor("block // stride" if any(x > 1 for x in st) else "block",
                               tuple(bb // ss for bb, ss in zip(b, st)), " with zero-padded borders")
        h = per_axis("halo", halo, nd, minimum=0)
        kv = tuple(length * ss + 2 * hh for length, ss, hh in zip(self.shape, st, h))
        self._set(block=b, halo=h, stride=st, _kv_shape=kv, _kv_axes_shape=kv)

    @property
    def kv_offset(self) -> tuple[int, ...]:
        """Per axis, the key coordinate of input coordinate 0 (the padding before the grid)."""
        return self.halo

    def progression(self, axis, x):
        b, h, s = self.block[axis], self.halo[axis], self.stride[axis]
        return (x // (b // s)) * b, _like(x, 1), _like(x, b + 2 * h)

    def _key(self):
        if any(s > 1 for s in self.stride):
            return (self.shape, self.block, self.halo, self.stride)
        return (self.shape, self.block, self.halo)

    def __repr__(self):
        extra = f", stride={fmt_axes(self.stride)}" if any(s > 1 for s in self.stride) else ""
        return f"PaddedHalo({self._grid_repr()}, block={fmt_axes(self.block)}, halo={fmt_axes(self.halo)}{extra})"
