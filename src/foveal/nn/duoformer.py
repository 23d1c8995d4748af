"""DuoFormer's scale-wise attention over the multi-scale tokens of backbone stages.

Tang, Zhang, Ho, Knudsen and Tasdizen, "DuoFormer: Leveraging Hierarchical Visual
Representations by Local and Global Attention" (2024; MIDL 2025).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from foveal._checks import positive_int
from foveal.nn._common import (
    attend,
    cached_pattern,
    check_backend,
    check_bool,
    check_heads,
    check_input,
    check_probability,
    qk_scale_or_default,
)
from foveal.patterns import Full, Neighborhood, Window
from foveal.patterns.base import Pattern

__all__ = ["ScaleWiseAttention", "multiscale_tokens"]


def multiscale_tokens(maps: Sequence[torch.Tensor], regions: tuple[int, int]) -> torch.Tensor:
    """The tokens of every region, coarse scales first: (B, Rh·Rw, S, D) from maps (B, Rh·f, Rw·f', D).

    Each map's grid is an integer multiple ``(f, f')`` of the region grid; region
    ``(i, j)`` takes that map's ``f × f'`` block at ``(i·f, j·f')`` in row-major order.
    Maps are taken in the order given (pass them coarse to fine).
    """
    rh, rw = regions
    out = []
    for x in maps:
        b, h, w, d = x.shape
        fh, fw = h // rh, w // rw
        out.append(x.reshape(b, rh, fh, rw, fw, d).permute(0, 1, 3, 2, 4, 5).reshape(b, rh * rw, fh * fw, d))
    return torch.cat(out, dim=2)


def _split_heads(qkv: torch.Tensor, heads: int):
    """(B, N, 3·D) → q, k, v as (B, heads, N, D/heads) views."""
    b, n, _ = qkv.shape
    return qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class ScaleWiseAttention(nn.Module):
    """DuoFormer: attention across the scales of each region, then attention across the regions.

    The feature maps of several backbone stages (channels last; map ``s`` on a grid
    ``grid_ratios[s]`` times the region grid, the grid of the coarsest map) are projected
    to ``dim``;
    each region's tokens are its blocks of every map, coarse to fine (1 + 4 + 16 + …
    tokens for stride-2 stages), preceded by a *scale token* (the region's average of
    every map, concatenated and projected: the paper's downsampled hierarchical
    features), plus a learned per-position embedding. *Scale attention* (local) is
    multi-head attention among the tokens of one region — ``attend`` with a
    block-diagonal ``Window`` pattern over the regions' runs of tokens; token
    ``region_token`` of each region (1, the coarsest map's token, as the reference
    returns) then represents the region in *patch attention* (global) across regions —
    ``Full``, or ``Neighborhood(regions, patch_kernel_size)`` for local patch attention.

    Shapes: ``maps`` a list of (B, Rh·g_s, Rw·g_s, in_dims[s]) with ``g_s = grid_ratios[s]``
    → (B, Rh, Rw, dim).

    Tang, Zhang, Ho, Knudsen and Tasdizen, "DuoFormer: Leveraging Hierarchical Visual
    Representations by Local and Global Attention" (2024). As in the reference, patch
    attention has no residual or MLP (the reference's patch block removed them) and
    scale attention returns the attended tokens; residuals, norms and MLPs belong to the
    surrounding block. Token order inside a 2×2 block is row-major here (the reference
    lists one stage column-major; it only permutes the positional embedding).

    Parameters: ``dim`` token width (the output's channels); ``num_heads`` heads of both
    attentions; ``in_dims`` channels of each map (in the order the maps are passed);
    ``grid_ratios`` each map's grid over the region grid (default
    ``(2^(S−1), …, 2, 1)``: backbone stages fine to coarse, stride 2); ``scale_token``
    prepend the pooled scale token; ``region_token``
    which per-region token feeds patch attention (default 1); ``patch_kernel_size``
    None for global patch attention, else a neighbourhood on the region grid;
    ``qkv_bias``; ``qk_scale`` (default ``head_dim ** -0.5``; the reference's
    ``MultiscaleAttention`` uses ``2 · dim ** -0.5``); ``proj_drop``; ``backend`` for
    ``attend``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        in_dims: Sequence[int],
        grid_ratios: Sequence[int] | None = None,
        scale_token: bool = True,
        region_token: int = 1,
        patch_kernel_size=None,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.dim, self.num_heads = check_heads(dim, num_heads)
        if isinstance(in_dims, (int, str)) or not isinstance(in_dims, Sequence) or len(in_dims) == 0:
            raise TypeError(f"in_dims must be a non-empty sequence of ints (channels of each map), got {in_dims!r}")
        self.in_dims = tuple(positive_int(f"in_dims[{i}]", d) for i, d in enumerate(in_dims))
        if grid_ratios is None:  # backbone order, fine to coarse, stride 2 between stages
            grid_ratios = tuple(2 ** (len(self.in_dims) - 1 - s) for s in range(len(self.in_dims)))
        if isinstance(grid_ratios, (int, str)) or not isinstance(grid_ratios, Sequence):
            raise TypeError(f"grid_ratios must be a sequence of ints or None, got {grid_ratios!r}")
        if len(grid_ratios) != len(self.in_dims):
            raise ValueError(
                f"grid_ratios must have one entry per map ({len(self.in_dims)}), got {tuple(grid_ratios)!r}"
            )
        self.grid_ratios = tuple(positive_int(f"grid_ratios[{i}]", r) for i, r in enumerate(grid_ratios))
        if min(self.grid_ratios) != 1:
            raise ValueError(f"one map must be on the region grid (grid ratio 1), got grid_ratios={self.grid_ratios}")
        scale_token = check_bool("scale_token", scale_token)
        self.tokens = int(scale_token) + sum(r * r for r in self.grid_ratios)
        self.region_token = positive_int("region_token", region_token, minimum=0)
        if self.region_token >= self.tokens:
            raise ValueError(f"region_token must be < the {self.tokens} tokens per region, got {region_token}")
        if patch_kernel_size is not None:
            patch_kernel_size = positive_int("patch_kernel_size", patch_kernel_size)
        self.patch_kernel_size = patch_kernel_size
        self.scale = qk_scale_or_default(qk_scale, self.dim // self.num_heads)
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        proj_drop = check_probability("proj_drop", proj_drop)
        self.backend = check_backend(backend)
        d = self.dim
        self.proj_in = nn.ModuleList(nn.Linear(c, d) for c in self.in_dims)
        self.scale_token = nn.Linear(sum(self.in_dims), d) if scale_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, self.tokens, d))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.scale_qkv = nn.Linear(d, 3 * d, bias=qkv_bias)
        self.scale_proj = nn.Linear(d, d)
        self.qkv = nn.Linear(d, 3 * d, bias=qkv_bias)
        self.proj = nn.Linear(d, d)
        self.proj_drop = nn.Dropout(proj_drop)

    # -- geometry ---------------------------------------------------------------------
    def pattern(self, grid) -> Pattern:
        """The patch-attention pattern on the region grid ``grid``: ``Full`` or a ``Neighborhood``."""
        grid = tuple(int(g) for g in grid)
        k = self.patch_kernel_size
        return cached_pattern(Full, math.prod(grid)) if k is None else cached_pattern(Neighborhood, grid, k)

    def scale_pattern(self, num_regions: int, tokens: int) -> Window:
        """The scale-attention pattern: ``tokens`` consecutive tokens per region attend among themselves."""
        return cached_pattern(Window, (num_regions * tokens,), tokens)

    # -- forward ----------------------------------------------------------------------
    def _check(self, maps):
        if isinstance(maps, torch.Tensor) or not isinstance(maps, Sequence):
            raise TypeError(f"maps must be a list of channels-last feature maps, got {type(maps).__name__}")
        if len(maps) != len(self.in_dims):
            raise ValueError(f"expected {len(self.in_dims)} feature maps (one per entry of in_dims), got {len(maps)}")
        for s, x in enumerate(maps):
            check_input(f"maps[{s}]", x, type(self).__name__)
            if x.dim() != 4:
                raise ValueError(f"maps[{s}] must be a (batch, height, width, channels) tensor, got {tuple(x.shape)}")
            if x.shape[-1] != self.in_dims[s]:
                raise ValueError(f"maps[{s}] has {x.shape[-1]} channels but in_dims[{s}] is {self.in_dims[s]}")
            if x.shape[0] != maps[0].shape[0]:
                raise ValueError(
                    f"maps differ in batch size: maps[0] has {maps[0].shape[0]}, maps[{s}] has {x.shape[0]}"
                )
        grids = [tuple(x.shape[1:3]) for x in maps]
        s0 = self.grid_ratios.index(1)
        rh, rw = grids[s0]
        for s, (h, w) in enumerate(grids):
            r = self.grid_ratios[s]
            if (h, w) != (rh * r, rw * r):
                raise ValueError(
                    f"maps[{s}] must have grid_ratios[{s}]={r} times the region grid {(rh, rw)} "
                    f"(the grid of maps[{s0}]), i.e. {(rh * r, rw * r)}, got {(h, w)}"
                )
        return grids, (rh, rw)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """``maps``: list of (B, H_s, W_s, in_dims[s]); returns (B, Rh, Rw, dim)."""
        grids, regions = self._check(maps)
        patch_pattern = self.pattern(regions)  # refuses a patch kernel larger than the region grid, before any work
        b, d, heads = maps[0].shape[0], self.dim, self.num_heads
        nr = math.prod(regions)
        order = sorted(range(len(maps)), key=lambda s: self.grid_ratios[s])  # coarse to fine
        tokens = multiscale_tokens([self.proj_in[s](maps[s]) for s in order], regions)  # (B, R, S, d)
        if self.scale_token is not None:
            pooled = [F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), regions) for x in maps]
            scale = self.scale_token(torch.cat(pooled, 1).flatten(2).transpose(1, 2))  # (B, R, d)
            tokens = torch.cat([scale[:, :, None], tokens], dim=2)
        tokens = tokens + self.pos_embed
        t = tokens.shape[2]
        # scale attention: the tokens of one region attend among themselves
        q, k, v = _split_heads(self.scale_qkv(tokens).reshape(b, nr * t, 3 * d), heads)
        y = attend(q, k, v, self.scale_pattern(nr, t), scale=self.scale, backend=self.backend)
        y = self.scale_proj(y.transpose(1, 2).reshape(b, nr, t, d))
        # patch attention: one token per region, across regions
        r = y[:, :, self.region_token]
        q, k, v = _split_heads(self.qkv(r), heads)
        out = attend(q, k, v, patch_pattern, scale=self.scale, backend=self.backend)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, nr, d)))
        return out.reshape(b, *regions, d)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, in_dims={self.in_dims}, "
            f"scale_token={self.scale_token is not None}, region_token={self.region_token}, "
            f"patch_kernel_size={self.patch_kernel_size}"
        )
