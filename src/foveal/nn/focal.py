"""Focal modulation (FocalNets): gated multi-level depth-wise context that multiplies the query.

Yang et al., "Focal Modulation Networks" (NeurIPS 2022).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from foveal._checks import positive_int
from foveal.nn._common import check_bool, check_channels_last, check_probability

__all__ = ["FocalModulation"]


class FocalModulation(nn.Module):
    """FocalNets' focal modulation: ``out = proj(q ⊙ h(Σ_ℓ gate_ℓ · ctx_ℓ))`` over a 2-D feature map.

    A linear layer ``f`` gives the query ``q``, the context ``ctx_0`` and ``focal_level + 1``
    gates (used raw, no sigmoid). Level ℓ (0-based) applies a depth-wise conv of kernel
    ``focal_factor·ℓ + focal_window`` and a GELU: ``ctx_{ℓ+1} = GELU(DWConv(ctx_ℓ))``; the
    global context is ``GELU(spatial mean of ctx_L)``. The modulator is
    ``h(Σ_{ℓ=1..L} gate_{ℓ-1}·ctx_ℓ + gate_L·global)`` with ``h`` a 1×1 conv, and the
    output ``proj(q ⊙ modulator)``. Input and output are channels-last (B, H, W, dim).
    Yang et al., "Focal Modulation Networks" (NeurIPS 2022).

    Parameters (as in the official code and timm): ``dim``; ``focal_window`` (kernel of
    the first level, 3); ``focal_level`` (number of levels L, 2); ``focal_factor``
    (kernel growth per level, 2; every kernel must be odd so the map keeps its size);
    ``bias`` of ``f`` and ``h``; ``use_postln_in_modulation`` (LayerNorm ``ln`` on
    ``q ⊙ modulator`` before ``proj``); ``normalize_modulator`` (divide the gated sum by
    ``L + 1``); ``proj_drop``. State-dict keys as timm's ``FocalModulation``: ``f``, ``h``
    (a 1×1 ``Conv2d``), ``proj``, ``focal_layers.{ℓ}.0`` (depth-wise ``Conv2d``, no bias),
    ``ln``.
    """

    def __init__(
        self,
        dim: int,
        focal_window: int = 3,
        focal_level: int = 2,
        focal_factor: int = 2,
        bias: bool = True,
        use_postln_in_modulation: bool = False,
        normalize_modulator: bool = False,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.focal_window = positive_int("focal_window", focal_window)
        self.focal_level = positive_int("focal_level", focal_level)
        self.focal_factor = positive_int("focal_factor", focal_factor, minimum=0)
        proj_drop = check_probability("proj_drop", proj_drop)
        self.kernel_sizes = [self.focal_factor * k + self.focal_window for k in range(self.focal_level)]
        even = [k for k in self.kernel_sizes if k % 2 == 0]
        if even:
            raise ValueError(
                f"every level's kernel focal_factor*level + focal_window must be odd (the map keeps its size), "
                f"got kernels {self.kernel_sizes} from focal_window={focal_window}, focal_factor={focal_factor}"
            )
        bias = check_bool("bias", bias)
        self.use_postln_in_modulation = check_bool("use_postln_in_modulation", use_postln_in_modulation)
        self.normalize_modulator = check_bool("normalize_modulator", normalize_modulator)
        self.f = nn.Linear(dim, 2 * dim + self.focal_level + 1, bias=bias)
        self.h = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.focal_layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False), nn.GELU())
            for k in self.kernel_sizes
        )
        if self.use_postln_in_modulation:
            self.ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__)
        c = self.dim
        q, ctx, gates = torch.split(self.f(x), (c, c, self.focal_level + 1), dim=-1)
        ctx = ctx.permute(0, 3, 1, 2)  # the depth-wise convs run channels-first
        gates = gates.permute(0, 3, 1, 2)
        ctx_all = 0
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, level : level + 1]
        ctx_global = self.act(ctx.mean((2, 3), keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level :]
        if self.normalize_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        modulator = F.linear(ctx_all.permute(0, 2, 3, 1), self.h.weight.flatten(1), self.h.bias)
        out = q * modulator
        if self.use_postln_in_modulation:
            out = self.ln(out)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, focal_window={self.focal_window}, focal_level={self.focal_level}, "
            f"focal_factor={self.focal_factor}, kernel_sizes={self.kernel_sizes}"
        )
