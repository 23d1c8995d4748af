"""Token mixers by name: the registry the tiny backbone and the vision benchmark choose from.

Each entry builds a module that maps a channels-last feature map ``(B, H, W, C)`` to the
same shape, from ``(dim, num_heads, grid)`` where ``grid`` is the stage's ``(H, W)``.
Entries are imported lazily, so ``foveal.models`` costs nothing until a mixer is built.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import nn

__all__ = ["MIXERS", "build_mixer", "mixer_names"]


def _fit(size: int, want: int) -> int:
    """The largest divisor of ``size`` that is at most ``want`` (window and grid sizes must divide)."""
    return max(d for d in range(1, min(size, want) + 1) if size % d == 0)


def _module(path: str, name: str):
    return getattr(importlib.import_module(path), name)


def _neighborhood(dim, heads, grid, kernel_size=7):
    k = min(kernel_size, *grid)
    return _module("foveal.nn.neighborhood", "NeighborhoodAttention2D")(dim, heads, kernel_size=k, rel_pos_bias=True)


def _window(dim, heads, grid, window=4, shift=True):
    w = min(_fit(grid[0], window), _fit(grid[1], window))
    cls = _module("foveal.nn.window", "WindowAttention")
    return _Alternate(cls(dim, heads, window_size=w), cls(dim, heads, window_size=w, shift_size=w // 2 if shift else 0))


def _maxvit(dim, heads, grid, partition=4):
    p = min(_fit(grid[0], partition), _fit(grid[1], partition))
    cls = _module("foveal.nn.maxvit", "MultiAxisAttention")
    return nn.Sequential(cls(dim, heads, partition_size=p, kind="block"), cls(dim, heads, partition_size=p, kind="grid"))


def _halo(dim, heads, grid, block=4, halo=2):
    b = min(block, *grid)
    return _module("foveal.nn.halo", "HaloAttention")(dim, heads, block_size=b, halo_size=halo)


def _davit(dim, heads, grid):
    return _module("foveal.nn.davit", "ChannelAttention")(dim, heads)


def _focal(dim, heads, grid):
    return _module("foveal.nn.focal", "FocalModulation")(dim, focal_window=3, focal_level=2)


def _ela(dim, heads, grid):
    return _module("foveal.nn.ela", "EfficientLocalAttention")(dim, num_groups=math.gcd(dim, 16))


def _pam(dim, heads, grid):
    return _module("foveal.nn.danet", "PositionAttention")(dim)


def _vwa(dim, heads, grid, window=4):
    w = min(_fit(grid[0], window), _fit(grid[1], window))
    ratios = tuple(r for r in (2, 4) if dim % (r * r) == 0) or (1,)
    return _module("foveal.nn.vwformer", "VaryingWindowAttention")(dim, heads, window_size=w, ratios=ratios)


def _contmix(dim, heads, grid):
    return _module("foveal.nn.contmix", "ContMix")(dim, num_heads=heads)


def _hilbert(dim, heads, grid, window=4, pool=2):
    return _module("foveal.nn.hierarchical", "HierarchicalLocalAttention")(
        dim, heads, window_size=min(window, *grid), pool=pool if min(grid) >= 2 * pool else None
    )


def _scatter(dim, heads, grid, window=4):
    return _ScatterWindows(_module("foveal.nn.scatter", "ScatteredLinearAttention")(dim, heads), window)


def _global(dim, heads, grid):
    return _FullAttention(dim, heads)


class _Alternate(nn.Module):
    """Two mixers applied in turn with a residual between them (Swin's regular then shifted windows)."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        x = x + self.first(x)
        return self.second(x)


class _ScatterWindows(nn.Module):
    """ScatterFormer's linear attention on a dense map: the groups are the ``window × window`` tiles."""

    def __init__(self, inner: nn.Module, window: int):
        super().__init__()
        self.inner, self.window = inner, window

    def forward(self, x):
        b, h, w, c = x.shape
        rows = torch.arange(h, device=x.device)[:, None] // self.window
        cols = torch.arange(w, device=x.device)[None, :] // self.window
        tile = (rows * (-(-w // self.window)) + cols).flatten()
        groups = (torch.arange(b, device=x.device)[:, None] * tile.numel() + tile[None, :]).flatten()
        return self.inner(x.reshape(b * h * w, c), groups).reshape(b, h, w, c)


class _FullAttention(nn.Module):
    """Plain global self-attention over all tokens of the map (the dense baseline), through ``attend``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got {dim} and {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def pattern(self, grid):
        from foveal.patterns import Full

        return Full(tuple(grid))

    def forward(self, x):
        from foveal.nn._common import attend

        b, *grid, c = x.shape
        qkv = self.qkv(x).reshape(b, -1, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attend(qkv[0], qkv[1], qkv[2], self.pattern(grid))
        return self.proj(out.transpose(1, 2).reshape(b, *grid, c))


#: name → (builder, one line saying what it is)
MIXERS = {
    "global": (_global, "full self-attention over the map (dense baseline)"),
    "neighborhood": (_neighborhood, "NAT 7×7 neighbourhood attention with relative-position bias"),
    "window": (_window, "Swin windows, regular then shifted"),
    "maxvit": (_maxvit, "MaxViT block then grid attention"),
    "halo": (_halo, "HaloNet blocked local attention with relative logits"),
    "davit-channel": (_davit, "DaViT channel group attention"),
    "focal": (_focal, "FocalNet focal modulation"),
    "ela": (_ela, "efficient local attention (strip pooling gates)"),
    "pam": (_pam, "DANet position attention"),
    "vwa": (_vwa, "VWFormer varying-window attention"),
    "contmix": (_contmix, "OverLoCK ContMix dynamic kernels"),
    "hilbert": (_hilbert, "Scale-DiT local attention in Hilbert order + global path"),
    "scatter-linear": (_scatter, "ScatterFormer linear attention within 4×4 tiles"),
}


def mixer_names() -> list[str]:
    """The names ``build_mixer`` accepts."""
    return list(MIXERS)


def build_mixer(name: str, dim: int, num_heads: int, grid: tuple[int, int], **kwargs) -> nn.Module:
    """A token mixer for a ``(B, *grid, dim)`` map, by name (see ``MIXERS``)."""
    if name not in MIXERS:
        raise ValueError(f"mixer must be one of {mixer_names()}, got {name!r}")
    return MIXERS[name][0](dim, num_heads, tuple(grid), **kwargs)
