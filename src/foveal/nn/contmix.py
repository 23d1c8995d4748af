"""ContMix: OverLoCK's context-mixing dynamic convolution.

Lou and Yu, "OverLoCK: An Overview-first-Look-Closely-next ConvNet with
Context-Mixing Dynamic Kernels" (CVPR 2025).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from foveal._checks import positive_int
from foveal.functional_na import na_av
from foveal.nn._common import cached_pattern, check_bool, check_channels_last, check_probability, qk_scale_or_default
from foveal.patterns import Neighborhood

__all__ = ["ContMix", "contmix_rpb_index"]


def contmix_rpb_index(grid, kernel_size: int, device=None) -> torch.Tensor:
    """Index into a flattened ``(2k−1)²`` bias table of every (pixel, neighbour) pair: ``(H·W, k²)``.

    NATTEN's relative-position bias: neighbour key ``y`` of query ``x`` on each axis uses
    entry ``y − x + k − 1`` (the border windows shift, so offsets run past ``±k//2``).
    """
    pattern = Neighborhood(tuple(grid), kernel_size)
    per_axis = []
    for axis, length in enumerate(pattern.shape):
        x = torch.arange(length, device=device)
        first, _, _ = pattern.progression(axis, x)
        keys = first[:, None] + torch.arange(kernel_size, device=device)
        per_axis.append(keys - x[:, None] + kernel_size - 1)  # (L, k)
    rh, rw = per_axis
    side = 2 * kernel_size - 1
    index = rh[:, None, :, None] * side + rw[None, :, None, :]  # (H, W, k, k)
    return index.reshape(len(rh) * len(rw), kernel_size * kernel_size)


class ContMix(nn.Module):
    """Context-mixing dynamic kernels (OverLoCK's ContMix) over a channels-last 2-D map.

    Each pixel's query features are compared with a ``region × region`` average-pooled
    context (per head: ``num_heads`` groups of the ``dim // 2`` query/key channels); a
    linear layer maps those ``region²`` affinities to the weights of a dynamic
    ``kernel_size²`` and a ``smk_size²`` depth-wise kernel (plus a NATTEN-style
    relative-position bias, then a softmax over each kernel), which aggregate the values
    (the input features, first half of the channels with the small kernel, second half
    with the large one, ``num_heads`` heads each) over every pixel's neighbourhood
    (``foveal.functional_na.na_av``); a linear projection follows.

    Shapes: ``x`` (B, H, W, dim) and optional ``context`` (B, H, W, ctx_dim) (the
    overview / context prior; default ``x`` itself) → (B, H, W, dim).

    Lou and Yu, "OverLoCK: An Overview-first-Look-Closely-next ConvNet with
    Context-Mixing Dynamic Kernels" (CVPR 2025). Quirks of the reference kept: the
    affinity scale is ``(dim // num_heads) ** -0.5`` although each head's query has
    ``dim // (2·num_heads)`` channels; one ``weight_proj`` (shared by all heads) emits
    the small kernel's ``smk_size²`` weights first, then the large kernel's; a map
    smaller than ``kernel_size`` is bilinearly enlarged (short side to ``kernel_size``)
    and average-pooled back after aggregation. The reference's BatchNorms after the
    query/key/output 1×1 convolutions are left to the surrounding block (they fold into
    these linear layers at inference). OverLoCK's ``num_heads=n`` is ``num_heads=2n``
    here: this module counts the affinity groups, which is what the parameters' shapes
    follow.

    Parameters: ``dim`` channels; ``num_heads`` affinity groups = heads of each kernel
    branch (``dim`` must be divisible by ``2·num_heads``); ``kernel_size`` the large
    dynamic kernel (7); ``region`` side of the pooled context (7);
    ``smk_size`` the small kernel (5); ``ctx_dim`` channels of ``context`` (default
    ``dim``); ``rel_pos_bias`` adds the ``(2k−1)²`` per-head tables ``rpb1`` (small) and
    ``rpb2`` (large), zero-initialised as in the reference; ``qk_scale`` overrides the
    affinity scale; ``proj_drop`` dropout after the projection. No ``backend``: the
    aggregation is ``na_av``, not ``attend``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        kernel_size: int = 7,
        region: int = 7,
        smk_size: int = 5,
        ctx_dim: int | None = None,
        rel_pos_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.num_heads = positive_int("num_heads", num_heads)
        if dim % (2 * num_heads):
            raise ValueError(
                f"dim must be divisible by 2 * num_heads (two kernel branches of num_heads heads), "
                f"got dim={dim} and num_heads={num_heads}"
            )
        self.kernel_size = positive_int("kernel_size", kernel_size)
        self.smk_size = positive_int("smk_size", smk_size)
        for name, k in (("kernel_size", kernel_size), ("smk_size", smk_size)):
            if k % 2 == 0:
                raise ValueError(f"{name} must be odd (a centred dynamic kernel), got {k}")
        self.region = positive_int("region", region)
        self.ctx_dim = dim if ctx_dim is None else positive_int("ctx_dim", ctx_dim)
        self.scale = qk_scale_or_default(qk_scale, dim // num_heads)  # the reference's, see above
        proj_drop = check_probability("proj_drop", proj_drop)
        self.weight_query = nn.Linear(dim, dim // 2, bias=False)
        self.weight_key = nn.Linear(self.ctx_dim, dim // 2, bias=False)
        self.weight_proj = nn.Linear(region * region, smk_size**2 + kernel_size**2)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if check_bool("rel_pos_bias", rel_pos_bias):
            self.rpb1 = nn.Parameter(torch.zeros(num_heads, 2 * smk_size - 1, 2 * smk_size - 1))
            self.rpb2 = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        else:
            self.register_parameter("rpb1", None)
            self.register_parameter("rpb2", None)

    def pattern(self, grid) -> Neighborhood:
        """The neighbourhood of the large dynamic kernel on ``grid`` (the small one is nested in it)."""
        return cached_pattern(Neighborhood, tuple(int(g) for g in grid), self.kernel_size)

    def _check(self, x, context):
        check_channels_last(x, self.dim, type(self).__name__)
        if context is not None:
            if not isinstance(context, torch.Tensor):
                raise TypeError(f"context must be a torch.Tensor or None, got {type(context).__name__}")
            want = (*x.shape[:3], self.ctx_dim)
            if tuple(context.shape) != want:
                raise ValueError(
                    f"context must have shape (batch, height, width, ctx_dim) = {want}, got {tuple(context.shape)}"
                )
            if context.dtype != x.dtype or context.device != x.device:
                raise TypeError(
                    f"context must match x in dtype and device ({x.dtype}, {x.device}), "
                    f"got {context.dtype}, {context.device}"
                )
        elif self.ctx_dim != self.dim:
            raise ValueError(f"context is required when ctx_dim ({self.ctx_dim}) differs from dim ({self.dim})")

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (B, H, W, dim); ``context``: (B, H, W, ctx_dim) or None (use ``x``). Returns (B, H, W, dim)."""
        self._check(x, context)
        context = x if context is None else context
        b, h0, w0, c = x.shape
        k, g = self.kernel_size, self.num_heads
        if min(h0, w0) < k:  # the reference enlarges small maps so the kernel fits
            size = (k, int(k / h0 * w0)) if h0 < w0 else (int(k / w0 * h0), k)
            x = _resize(x, size)
            context = _resize(context, size)
        _, h, w, _ = x.shape
        n = h * w
        q = (self.weight_query(x) * self.scale).reshape(b, n, g, -1).transpose(1, 2)  # (B, G, N, c)
        pooled = F.adaptive_avg_pool2d(context.permute(0, 3, 1, 2), self.region).flatten(2).transpose(1, 2)
        key = self.weight_key(pooled).reshape(b, -1, g, q.shape[-1]).transpose(1, 2)  # (B, G, S², c)
        kernels = self.weight_proj(q @ key.transpose(-1, -2))  # (B, G, N, s² + k²)
        small, large = kernels.split([self.smk_size**2, k * k], dim=-1)
        if self.rpb1 is not None:
            small = small + _bias(self.rpb1, (h, w), self.smk_size)
            large = large + _bias(self.rpb2, (h, w), k)
        small, large = small.softmax(-1), large.softmax(-1)
        v = x.reshape(b, h, w, 2, g, c // (2 * g)).permute(3, 0, 4, 1, 2, 5)  # (2, B, G, H, W, c')
        out_small = na_av(small.reshape(b, g, h, w, -1), v[0], self.smk_size)
        out_large = na_av(large.reshape(b, g, h, w, -1), v[1], k)
        out = torch.cat([out_small, out_large], dim=1).permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        if (h, w) != (h0, w0):
            out = F.adaptive_avg_pool2d(out.permute(0, 3, 1, 2), (h0, w0)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, kernel_size={self.kernel_size}, smk_size={self.smk_size}, num_heads={self.num_heads}, "
            f"region={self.region}, ctx_dim={self.ctx_dim}, rel_pos_bias={self.rpb1 is not None}"
        )


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def _bias(table: torch.Tensor, grid, kernel_size: int) -> torch.Tensor:
    """Per-head bias of every (pixel, neighbour): (heads, H·W, k²) from a (heads, 2k−1, 2k−1) table."""
    index = contmix_rpb_index(grid, kernel_size, device=table.device)
    return table.flatten(1)[:, index]
