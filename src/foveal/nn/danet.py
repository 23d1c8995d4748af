"""DANet's position and channel attention modules (PAM, CAM), channels-last.

Fu et al., "Dual Attention Network for Scene Segmentation" (CVPR 2019); the same
modules appear in Sinha and Dolz, "Multi-scale self-guided attention for medical
image segmentation" (2020).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from foveal._checks import positive_int
from foveal.nn._common import attend, cached_pattern, check_backend, check_channels_last
from foveal.patterns import Full

__all__ = ["PositionAttention", "ChannelAffinityAttention", "channel_affinity_attention"]

_LAYOUT = "(batch, *grid, dim) with at least one grid axis"


def _pointwise(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1×1 ``Conv2d`` applied to channels-last ``x`` (same maths, checkpoint-compatible weights)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class PositionAttention(nn.Module):
    """DANet PAM: full spatial self-attention with reduced queries and keys, added to the input through ``gamma``.

    ``q = W_q x`` and ``k = W_k x`` (``dim // reduction`` channels, 1×1 convs), ``v = W_v x``
    (``dim`` channels); ``out = gamma · softmax(q kᵀ) v + x`` with *no* ``1/sqrt(d)``
    scaling (as in DANet) and ``gamma`` a learned scalar initialised to 0 (so the module
    starts as the identity). Input and output are channels-last (B, *grid, dim) — any
    number of grid axes. The attention runs through ``foveal.functional.attend`` over the
    ``Full`` pattern, so memory stays bounded by the kernel's tiles instead of the N×N
    map DANet materialises. Fu et al., "Dual Attention Network for Scene Segmentation"
    (CVPR 2019).

    Parameters: ``dim`` channels; ``reduction`` of the query/key channels (8 in DANet;
    ``dim // reduction`` must be at least 1); ``backend`` for ``attend``. State-dict
    keys as DANet's ``PAM_Module``: ``query_conv``, ``key_conv``, ``value_conv``
    (1×1 ``Conv2d``), ``gamma``.
    """

    def __init__(self, dim: int, reduction: int = 8, backend: str = "auto"):
        super().__init__()
        dim = positive_int("dim", dim)
        reduction = positive_int("reduction", reduction)
        if dim // reduction < 1:
            raise ValueError(f"dim // reduction must be >= 1, got dim={dim} and reduction={reduction}")
        self.dim, self.reduction, self.backend = dim, reduction, check_backend(backend)
        self.query_conv = nn.Conv2d(dim, dim // reduction, 1)
        self.key_conv = nn.Conv2d(dim, dim // reduction, 1)
        self.value_conv = nn.Conv2d(dim, dim, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def pattern(self, grid) -> Full:
        """The pattern this module attends over on ``grid``: ``Full`` (from the shared bounded cache)."""
        return cached_pattern(Full, tuple(int(g) for g in grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, *grid, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__, None, _LAYOUT)
        b, *grid, c = x.shape
        n = math.prod(grid)
        flat = x.reshape(b, 1, n, c)
        q, k, v = (_pointwise(flat, conv) for conv in (self.query_conv, self.key_conv, self.value_conv))
        out = attend(q, k, v, self.pattern(grid), scale=1.0, backend=self.backend)
        return self.gamma * out.reshape(x.shape) + x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, reduction={self.reduction}"


def channel_affinity_attention(x: torch.Tensor) -> torch.Tensor:
    """DANet CAM without the residual: ``softmax(max(E) − E) X`` with ``E = X Xᵀ`` over channels.

    ``x`` is (B, *grid, C); returns the same shape. The row maximum is subtracted as in
    DANet; softmax is shift-invariant, so this equals ``softmax(−E)``.
    """
    b, c = x.shape[0], x.shape[-1]
    flat = x.reshape(b, -1, c)  # (B, N, C)
    energy = flat.transpose(1, 2) @ flat  # (B, C, C)
    energy = energy.amax(-1, keepdim=True) - energy
    attn = torch.softmax(energy, dim=-1)
    return (flat @ attn.transpose(1, 2)).reshape(x.shape)


class ChannelAffinityAttention(nn.Module):
    """DANet CAM: each channel becomes a mix of all channels, weighted by their (inverted) affinity.

    With ``X`` the (C, N) feature matrix and ``E = X Xᵀ`` (C×C), the attention is
    ``softmax(max_row(E) − E)`` (DANet's form; equal to ``softmax(−E)``), and
    ``out = gamma · (attn X) + x`` with ``gamma`` a learned scalar initialised to 0. No
    projections: the only parameter is ``gamma``. Input and output are channels-last
    (B, *grid, dim). Cost O(N·C²), linear in tokens. Fu et al., "Dual Attention Network
    for Scene Segmentation" (CVPR 2019).

    Parameters: ``dim`` channels (checked against the input). State-dict key ``gamma``
    as DANet's ``CAM_Module``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, *grid, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__, None, _LAYOUT)
        return self.gamma * channel_affinity_attention(x) + x

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
