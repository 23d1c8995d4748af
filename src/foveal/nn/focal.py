"""Focal modulation (FocalNets): gated multi-level depth-wise context that multiplies the query.

Yang et al., "Focal Modulation Networks" (NeurIPS 2022).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from foveal._checks import positive_int
from foveal.nn._common import check_bool, check_channels_last, check_probability, check_ratio

__all__ = ["FocalModulation"]


class FocalModulation(nn.Module):
    """FocalNets' focal modulation: ``out = proj(q ⊙ h(Σ_ℓ gate_ℓ · ctx_ℓ))`` over a 2-D feature map.

    A 1×1 projection ``f`` gives the query ``q``, the context ``ctx_0`` and
    ``focal_level + 1`` gates (used raw, no sigmoid). Level ℓ (0-based) applies a
    depth-wise conv of kernel ``focal_factor·ℓ + focal_window`` and a GELU:
    ``ctx_{ℓ+1} = GELU(DWConv(ctx_ℓ))``; the global context is
    ``GELU(spatial mean of ctx_L)``. The modulator is
    ``h(Σ_{ℓ=1..L} gate_{ℓ-1}·ctx_ℓ + gate_L·global)`` with ``h`` a 1×1 conv, and the
    output ``proj(q ⊙ modulator)`` (``norm(q ⊙ modulator)`` with ``use_post_norm``).
    Input and output are channels-last (B, H, W, dim).
    Yang et al., "Focal Modulation Networks" (NeurIPS 2022).

    Parameters (timm's ``FocalModulation``): ``dim``; ``focal_window`` (kernel of the
    first level, 3); ``focal_level`` (number of levels L, 2); ``focal_factor`` (kernel
    growth per level, 2; every kernel must be odd so the map keeps its size); ``bias``
    of ``f`` and ``h``; ``use_post_norm`` (a LayerNorm ``norm`` over channels on
    ``q ⊙ modulator`` before ``proj``; the official code's ``use_postln_in_modulation``);
    ``normalize_modulator`` (divide the gated sum by ``L + 1``); ``norm_eps`` (the post
    norm's epsilon: 1e-5 in timm's FocalNet models and the official code; timm's
    standalone ``FocalModulation`` defaults to ``LayerNorm2d``'s 1e-6); ``proj_drop``.

    State dict as timm saves it: ``f``, ``h``, ``proj`` are 1×1 ``Conv2d`` (weights
    ``[C', C, 1, 1]``, applied as matrix products on channels-last maps),
    ``focal_layers.{ℓ}.0`` depth-wise ``Conv2d`` without bias, ``norm``. The official
    FocalNets layout (``f``, ``proj`` as ``Linear`` weights ``[C', C]``, the post norm as
    ``ln``) loads too.
    """

    def __init__(
        self,
        dim: int,
        focal_window: int = 3,
        focal_level: int = 2,
        focal_factor: int = 2,
        bias: bool = True,
        use_post_norm: bool = False,
        normalize_modulator: bool = False,
        norm_eps: float = 1e-5,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.focal_window = positive_int("focal_window", focal_window)
        self.focal_level = positive_int("focal_level", focal_level)
        self.focal_factor = positive_int("focal_factor", focal_factor, minimum=0)
        norm_eps = check_ratio("norm_eps", norm_eps)
        proj_drop = check_probability("proj_drop", proj_drop)
        self.kernel_sizes = [self.focal_factor * k + self.focal_window for k in range(self.focal_level)]
        even = [k for k in self.kernel_sizes if k % 2 == 0]
        if even:
            raise ValueError(
                f"every level's kernel focal_factor*level + focal_window must be odd (the map keeps its size), "
                f"got kernels {self.kernel_sizes} from focal_window={focal_window}, focal_factor={focal_factor}"
            )
        bias = check_bool("bias", bias)
        self.use_post_norm = check_bool("use_post_norm", use_post_norm)
        self.normalize_modulator = check_bool("normalize_modulator", normalize_modulator)
        self.f = nn.Conv2d(dim, 2 * dim + self.focal_level + 1, kernel_size=1, bias=bias)
        self.h = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Conv2d(dim, dim, kernel_size=1)
        self.proj_drop = nn.Dropout(proj_drop)
        self.focal_layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False), nn.GELU())
            for k in self.kernel_sizes
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if self.use_post_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__)
        c = self.dim
        z = F.linear(x, self.f.weight.flatten(1), self.f.bias)
        q, ctx, gates = torch.split(z, (c, c, self.focal_level + 1), dim=-1)
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
        if self.norm is not None:
            out = self.norm(out)
        return self.proj_drop(F.linear(out, self.proj.weight.flatten(1), self.proj.bias))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the official FocalNets layout: Linear f and proj ([C', C]), the post norm as ``ln``
        for name in ("weight", "bias"):
            old = state_dict.pop(prefix + "ln." + name, None)
            if old is not None:
                state_dict.setdefault(prefix + "norm." + name, old)
        for layer in ("f", "proj"):
            w = state_dict.get(prefix + layer + ".weight")
            if isinstance(w, torch.Tensor) and w.dim() == 2:
                state_dict[prefix + layer + ".weight"] = w[:, :, None, None]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, focal_window={self.focal_window}, focal_level={self.focal_level}, "
            f"focal_factor={self.focal_factor}, kernel_sizes={self.kernel_sizes}, use_post_norm={self.use_post_norm}"
        )
