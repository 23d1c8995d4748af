"""Neighbourhood attention modules: drop-ins for NATTEN's ``NeighborhoodAttention{1,2,3}D``.

Documented drop-ins: the same class names, NATTEN's constructor arguments with NATTEN's
names and positional order (``embed_dim, num_heads, kernel_size, stride, dilation,
is_causal, qkv_bias, qk_scale, proj_drop``; foveal's own additions ``rel_pos_bias`` and
``backend`` are keyword-only after them) and NATTEN's state-dict keys (``qkv``, ``proj``)
as NATTEN 0.20+, so a NATTEN checkpoint loads and gives the same output; unlike NATTEN on
CPU they also train. ``rel_pos_bias=True`` adds the per-head relative-position bias of
the original NAT (a ``(2k−1)^dim`` table per head), which NATTEN dropped in 0.20.
Hassani et al., "Neighborhood Attention Transformer" (CVPR 2023); "Dilated
Neighborhood Attention Transformer" (2022).
"""

from __future__ import annotations

import torch
from torch import nn

from foveal._checks import per_axis, per_axis_bool
from foveal.bias import RelativePositionBias
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
from foveal.patterns import Neighborhood

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttention(nn.Module):
    """Shared body of ``NeighborhoodAttention{1,2,3}D`` (``na_dim`` grid axes).

    A drop-in for NATTEN's module of the same name, so it keeps NATTEN's argument names
    (``embed_dim``, ``is_causal``) and positional order instead of foveal's
    ``(dim, num_heads, ...)`` policy; ``rel_pos_bias`` and ``backend`` are keyword-only.
    """

    na_dim = 0

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kernel_size,
        stride=1,
        dilation=1,
        is_causal=False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        *,
        rel_pos_bias: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        embed_dim, num_heads = check_heads(embed_dim, num_heads, "embed_dim")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kernel_size = per_axis("kernel_size", kernel_size, self.na_dim)
        self.stride = per_axis("stride", stride, self.na_dim)
        self.dilation = per_axis("dilation", dilation, self.na_dim)
        self.is_causal = per_axis_bool("is_causal", is_causal, self.na_dim)
        self.scale = qk_scale_or_default(qk_scale, self.head_dim)
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        proj_drop = check_probability("proj_drop", proj_drop)
        self.backend = check_backend(backend)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if check_bool("rel_pos_bias", rel_pos_bias):
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def pattern(self, grid: tuple[int, ...]) -> Neighborhood:
        """The ``Neighborhood`` pattern this module uses on ``grid`` (from the shared bounded cache)."""
        grid = tuple(int(g) for g in grid)
        return cached_pattern(Neighborhood, grid, self.kernel_size, self.dilation, self.stride, self.is_causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, *grid, embed_dim), channels last; returns the same shape."""
        check_input("x", x, type(self).__name__)
        if x.dim() != self.na_dim + 2:
            raise ValueError(
                f"{type(self).__name__} expects (batch, {self.na_dim} grid axes, embed_dim), got shape {tuple(x.shape)}"
            )
        b, *grid, c = x.shape
        if c != self.embed_dim:
            raise ValueError(f"x has {c} channels but embed_dim is {self.embed_dim}")
        pattern = self.pattern(grid)
        qkv = self.qkv(x).reshape(b, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = None
        if self.rpb is not None:
            bias = RelativePositionBias(grid, tuple(k - 1 for k in self.kernel_size), self.rpb, step=self.dilation)
        out = attend(qkv[0], qkv[1], qkv[2], pattern, bias=bias, scale=self.scale, backend=self.backend)
        out = out.transpose(1, 2).reshape(b, *grid, c)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}, "
            f"rel_pos_bias={self.rpb is not None}"
        )


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighbourhood attention over (batch, length, embed_dim); NATTEN's module, trainable on CPU."""

    na_dim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighbourhood attention over (batch, height, width, embed_dim); NATTEN's module, trainable on CPU."""

    na_dim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighbourhood attention over (batch, depth, height, width, embed_dim); NATTEN's module, trainable on CPU."""

    na_dim = 3
