"""ELA: efficient local attention, a strip-pooled positional gate for feature maps.

Xu and Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural Networks" (2024).
"""

from __future__ import annotations

import torch
from torch import nn

from foveal._checks import positive_int
from foveal.nn._common import check_channels_last

__all__ = ["EfficientLocalAttention", "ela_gate"]


def ela_gate(x: torch.Tensor, conv: nn.Conv1d, gn: nn.GroupNorm) -> torch.Tensor:
    """``x · a_h · a_w`` for channels-last ``x`` (B, H, W, C), with the strips made by one shared conv and norm."""
    b, h, w, c = x.shape
    strip_h = x.mean(2).transpose(1, 2)  # (B, C, H): mean over the width
    strip_w = x.mean(1).transpose(1, 2)  # (B, C, W): mean over the height
    a_h = torch.sigmoid(gn(conv(strip_h))).transpose(1, 2)  # (B, H, C)
    a_w = torch.sigmoid(gn(conv(strip_w))).transpose(1, 2)  # (B, W, C)
    return x * a_h[:, :, None, :] * a_w[:, None, :, :]


class EfficientLocalAttention(nn.Module):
    """ELA: the input times a sigmoid gate along the height and one along the width, both from strip pooling.

    ``a_h = σ(GN(Conv1d(mean over W of x)))`` and ``a_w = σ(GN(Conv1d(mean over H of x)))``
    with one shared 1-D convolution and GroupNorm; ``out = x · a_h · a_w``. Input and
    output are channels-last (B, H, W, dim). Xu and Wan, "ELA: Efficient Local Attention
    for Deep Convolutional Neural Networks" (2024).

    Parameters: ``dim`` channels; ``kernel_size`` of the 1-D convolution (odd; 7 as in
    ELA-B, the paper's default, 5 for ELA-T/S); ``num_groups`` of the GroupNorm (16 as
    in ELA-B/S/L, 32 for ELA-T; must divide ``dim``); ``conv_groups`` of the convolution
    (``None``: ``dim``, depth-wise as in ELA-T/B; ``dim // 8`` for ELA-S/L). The
    convolution has no bias, as in the paper. State-dict keys: ``conv``, ``gn``.
    """

    def __init__(self, dim: int, kernel_size: int = 7, num_groups: int = 16, conv_groups: int | None = None):
        super().__init__()
        dim = positive_int("dim", dim)
        kernel_size = positive_int("kernel_size", kernel_size)
        num_groups = positive_int("num_groups", num_groups)
        conv_groups = dim if conv_groups is None else positive_int("conv_groups", conv_groups)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the strips keep their length), got {kernel_size}")
        if dim % num_groups:
            raise ValueError(f"num_groups must divide dim, got num_groups={num_groups} and dim={dim}")
        if dim % conv_groups:
            raise ValueError(f"conv_groups must divide dim, got conv_groups={conv_groups} and dim={dim}")
        self.dim, self.kernel_size = dim, kernel_size
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=conv_groups, bias=False)
        self.gn = nn.GroupNorm(num_groups, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__)
        return ela_gate(x, self.conv, self.gn)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, kernel_size={self.kernel_size}, num_groups={self.gn.num_groups}, "
            f"conv_groups={self.conv.groups}"
        )
