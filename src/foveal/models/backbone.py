"""A tiny hierarchical vision backbone whose token mixer is chosen by name.

Stem (strided conv) → stages of pre-norm blocks ``x + mixer(norm(x))``, ``x + mlp(norm(x))``
→ 2×2 strided-conv downsampling between stages, channels-last throughout, as in
Swin/NAT/MaxViT-style hierarchical models but small enough to train on a CPU.
``Classifier`` and ``Segmenter`` put a head on it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from foveal._checks import positive_int
from foveal.models.mixers import build_mixer
from foveal.nn.mlp import Mlp

__all__ = ["Backbone", "Classifier", "Segmenter"]


class Block(nn.Module):
    """One transformer block over a channels-last map: pre-norm mixer and MLP, each with a residual."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(dim), mixer
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Downsample(nn.Module):
    """2×2 stride-2 convolution between stages, on channels-last maps."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim_in)
        self.conv = nn.Conv2d(dim_in, dim_out, 2, stride=2)

    def forward(self, x):
        return self.conv(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Backbone(nn.Module):
    """Hierarchical backbone: ``(B, in_chans, H, W)`` images → list of channels-last stage maps.

    ``mixer`` names the token mixer (``foveal.models.mixers.MIXERS``); stage ``s`` has
    ``dims[s]`` channels, ``depths[s]`` blocks and ``heads[s]`` heads on a grid of
    ``img_size / (stem_stride · 2^s)``. The image size is fixed at construction
    because window and grid mixers size themselves to each stage's grid.
    """

    def __init__(
        self,
        mixer: str = "neighborhood",
        img_size: int = 32,
        in_chans: int = 3,
        dims: Sequence[int] = (32, 64, 96),
        depths: Sequence[int] = (1, 1, 1),
        heads: Sequence[int] = (2, 4, 4),
        stem_stride: int = 2,
        mlp_ratio: float = 2.0,
        mixer_kwargs: dict | None = None,
    ):
        super().__init__()
        img_size, stem_stride = positive_int("img_size", img_size), positive_int("stem_stride", stem_stride)
        if not (len(dims) == len(depths) == len(heads)) or not 1 <= len(dims) <= 4:
            raise ValueError(
                f"dims, depths and heads must have one entry per stage (1 to 4 stages), got {dims}, {depths}, {heads}"
            )
        if img_size % (stem_stride * 2 ** (len(dims) - 1)):
            raise ValueError(
                f"img_size must be divisible by stem_stride·2^(stages−1) = {stem_stride * 2 ** (len(dims) - 1)}, "
                f"got {img_size}"
            )
        self.mixer_name, self.img_size, self.in_chans = mixer, img_size, in_chans
        self.dims = tuple(dims)
        self.stem = nn.Conv2d(in_chans, dims[0], 3, stride=stem_stride, padding=1)
        self.stages, self.downs = nn.ModuleList(), nn.ModuleList()
        size = img_size // stem_stride
        for s, (dim, depth, h) in enumerate(zip(dims, depths, heads)):
            if s:
                self.downs.append(_Downsample(dims[s - 1], dim))
                size //= 2
            mixers = [build_mixer(mixer, dim, h, (size, size), **(mixer_kwargs or {})) for _ in range(depth)]
            self.stages.append(nn.Sequential(*(Block(dim, m, mlp_ratio) for m in mixers)))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != self.in_chans or images.shape[2:] != (self.img_size,) * 2:
            raise ValueError(
                f"images must be (B, {self.in_chans}, {self.img_size}, {self.img_size}), got {tuple(images.shape)}"
            )
        x = self.stem(images).permute(0, 2, 3, 1)
        feats = []
        for s, stage in enumerate(self.stages):
            if s:
                x = self.downs[s - 1](x)
            x = stage(x)
            feats.append(x)
        return feats


class Classifier(nn.Module):
    """Backbone + global average pooling + linear: ``(B, C, H, W)`` → ``(B, num_classes)`` logits."""

    def __init__(self, num_classes: int, **backbone):
        super().__init__()
        self.backbone = Backbone(**backbone)
        self.norm = nn.LayerNorm(self.backbone.dims[-1])
        self.head = nn.Linear(self.backbone.dims[-1], positive_int("num_classes", num_classes))

    def forward(self, images):
        x = self.backbone(images)[-1]
        return self.head(self.norm(x.mean(dim=(1, 2))))


class Segmenter(nn.Module):
    """Backbone + a light FPN-style head: every stage projected, upsampled to the first stage and summed.

    ``(B, C, H, W)`` → ``(B, num_classes, H, W)`` logits (bilinear upsampling to the input).
    """

    def __init__(self, num_classes: int, head_dim: int = 32, **backbone):
        super().__init__()
        self.backbone = Backbone(**backbone)
        self.lateral = nn.ModuleList(nn.Linear(d, head_dim) for d in self.backbone.dims)
        self.head = nn.Sequential(nn.GELU(), nn.Conv2d(head_dim, positive_int("num_classes", num_classes), 1))

    def forward(self, images):
        feats = self.backbone(images)
        size = feats[0].shape[1:3]
        fused = 0
        for f, lateral in zip(feats, self.lateral):
            y = lateral(f).permute(0, 3, 1, 2)
            fused = fused + nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)
        logits = self.head(fused)
        return nn.functional.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)
