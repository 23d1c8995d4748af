"""MaxViT: multi-axis attention (block + grid) and the MaxViT block, channels last, over ``attend``.

Block attention is attention within non-overlapping ``P × P`` windows (``Window(grid, P)``);
grid attention is attention among the ``P × P`` tokens spread over the whole image at
stride ``grid // P`` (``Grid(grid, P)``, MaxViT's ``grid_partition``). Both carry a
``(2P−1)²``-entry relative-position table per head; for grid attention the offsets are
counted in the partition's own coordinates, i.e. in units of the stride.
Tu et al., "MaxViT: Multi-Axis Vision Transformer" (ECCV 2022); timm ``maxxvit.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from foveal._checks import per_axis, positive_int
from foveal.nn._common import (
    cached_pattern,
    check_backend,
    check_channels_last,
    check_input,
    check_heads,
    check_no_attn_drop,
    check_probability,
    check_ratio,
    drop_path,
)
from foveal.nn.window import _TableAttention
from foveal.patterns.local import Grid, Window

__all__ = ["MultiAxisAttention", "MBConv", "MaxViTBlock"]

_KINDS = ("block", "grid")


class MultiAxisAttention(_TableAttention):
    """MaxViT's block or grid attention with its relative-position bias, on (batch, H, W, dim).

    ``kind="block"``: each token attends to its ``P × P`` window; ``kind="grid"``: to the
    ``P × P`` tokens congruent to it modulo ``(H // P, W // P)``, a dilated, image-wide
    sparse grid. Softmax attention plus a learned per-head bias indexed by the relative
    position inside the partition.

    Shapes: ``x`` is (batch, H, W, dim), channels last; H and W must be divisible by
    ``partition_size`` (MaxViT does not pad). Returns the same shape.

    Tu et al., "MaxViT: Multi-Axis Vision Transformer" (ECCV 2022). The table has
    timm's ``RelPosBias`` layout (``relative_position_bias_table`` of shape
    ``((2P−1)², num_heads)``, rows in the order of the offset query − key). The qkv
    projection is laid out ``(3, heads, head_dim)`` as in Swin and timm's
    ``head_first=False``.

    Parameters:
        dim: channels.
        num_heads: attention heads (MaxViT uses ``dim // 32``).
        partition_size: ``P`` (int or pair): the window of block attention, the grid
            of grid attention (MaxViT: 7 at 224²).
        kind: ``"block"`` or ``"grid"``.
        rel_pos_bias: learn the relative-position table.
        qkv_bias: bias in the qkv projection.
        qk_scale: score scale, default ``head_dim ** -0.5``.
        attn_drop: must be 0.0 (no dropout on attention weights in ``attend``).
        proj_drop: dropout after the output projection.
        backend: ``attend`` backend, ``"auto"`` by default.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        partition_size=7,
        kind: str = "block",
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        dim, num_heads = check_heads(dim, num_heads)
        if not isinstance(kind, str) or kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self.partition_size = per_axis("partition_size", partition_size, 2)
        check_no_attn_drop(attn_drop)
        self.backend = check_backend(backend)
        self.kind = kind
        self._init_attention(dim, num_heads, self.partition_size, qkv_bias, qk_scale, proj_drop, rel_pos_bias)

    def _check_grid(self, grid: tuple[int, ...]) -> None:
        for a, (g, p) in enumerate(zip(grid, self.partition_size)):
            if g % p:
                raise ValueError(
                    f"partition_size must divide the grid on every axis; grid[{a}]={g} is not divisible by "
                    f"partition_size[{a}]={p}"
                )

    def pattern(self, grid) -> Window | Grid:
        """``Window(grid, P)`` for block attention, ``Grid(grid, P)`` for grid attention."""
        grid = tuple(int(g) for g in grid)
        self._check_grid(grid)
        return cached_pattern(Window if self.kind == "block" else Grid, grid, self.partition_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, H, W, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__, 4, "(batch, H, W, dim)")
        grid = tuple(x.shape[1:3])
        pattern = self.pattern(grid)
        # grid attention: offsets in the partition's own coordinates (units of the stride)
        step = 1 if self.kind == "block" else tuple(g // p for g, p in zip(grid, self.partition_size))
        return self._attend(x, pattern, self.partition_size, step)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, partition_size={self.partition_size}, kind={self.kind!r}, "
            f"rel_pos_bias={self.relative_position_bias_table is not None}"
        )


class _SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: channel gates ``sigmoid(fc2(SiLU(fc1(mean over space))))`` (NCHW)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class MBConv(nn.Module):
    """MaxViT's pre-norm MBConv with squeeze-excitation, stride 1, on (batch, dim, H, W).

    ``x + conv1x1(SE(GELU(BN(dwconv3x3(GELU(BN(conv1x1(BN(x)))))))))``: a pre-norm
    BatchNorm, a 1×1 expansion to ``expand_ratio · dim``, depth-wise 3×3, squeeze-
    excitation reducing to ``se_ratio · dim`` channels, a 1×1 projection back to ``dim``,
    and the residual (timm ``MbConvBlock`` with MaxViT's defaults: BN, GELU, SE with
    SiLU). Tu et al., "MaxViT" (2022); Sandler et al., "MobileNetV2" (2018); Hu et al.,
    "Squeeze-and-Excitation Networks" (2018).
    """

    def __init__(self, dim: int, expand_ratio: float = 4.0, se_ratio: float = 0.25, drop_path: float = 0.0):
        super().__init__()
        dim = positive_int("dim", dim)
        expand_ratio = check_ratio("expand_ratio", expand_ratio)
        se_ratio = check_ratio("se_ratio", se_ratio)
        mid = max(1, int(round(dim * expand_ratio)))
        self.drop_path = check_probability("drop_path", drop_path)
        self.pre_norm = nn.BatchNorm2d(dim)
        self.conv1_1x1 = nn.Conv2d(dim, mid, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid)
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.se = _SqueezeExcite(mid, max(1, int(se_ratio * dim)))
        self.conv3_1x1 = nn.Conv2d(mid, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, dim, H, W), channels first; returns the same shape."""
        check_input("x", x, type(self).__name__)
        if x.dim() != 4 or x.shape[1] != self.pre_norm.num_features:
            raise ValueError(f"MBConv expects (batch, dim={self.pre_norm.num_features}, H, W), got {tuple(x.shape)}")
        y = self.conv1_1x1(self.pre_norm(x))
        y = F.gelu(self.norm1(y))
        y = F.gelu(self.norm2(self.conv2_kxk(y)))
        y = self.conv3_1x1(self.se(y))
        return x + drop_path(y, self.drop_path, self.training)


class _PartitionAttention(nn.Module):
    """Pre-norm residual block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (channels last)."""

    def __init__(
        self, dim, num_heads, partition_size, kind, mlp_ratio, rel_pos_bias, qkv_bias, proj_drop, drop_path, backend
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiAxisAttention(
            dim, num_heads, partition_size, kind, rel_pos_bias=rel_pos_bias, qkv_bias=qkv_bias, proj_drop=proj_drop,
            backend=backend,
        )
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(proj_drop), nn.Linear(hidden, dim), nn.Dropout(proj_drop)
        )
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class MaxViTBlock(nn.Module):
    """One MaxViT block: MBConv, then block attention + MLP, then grid attention + MLP, on (batch, H, W, dim).

    Local mixing by the convolution, local attention within ``P × P`` windows, and
    global, dilated attention among tokens ``H // P`` and ``W // P`` apart: every
    token reaches every other in one block at linear cost. Each attention stage is
    pre-norm (LayerNorm) with residuals, followed by a pre-norm MLP with residual.

    Shapes: ``x`` is (batch, H, W, dim), channels last, H and W divisible by
    ``partition_size``; returns the same shape. Stride 1 (no downsampling: use a
    separate stem/downsample between stages).

    Tu et al., "MaxViT: Multi-Axis Vision Transformer" (ECCV 2022); submodule names
    follow timm's ``MaxxVitBlock`` (``conv``, ``attn_block``, ``attn_grid``).

    Parameters:
        dim: channels.
        num_heads: attention heads of both attentions (MaxViT: ``dim // 32``).
        partition_size: ``P``, window of block attention and grid of grid attention.
        expand_ratio: MBConv expansion (4).
        mlp_ratio: MLP hidden width over ``dim`` (4).
        se_ratio: squeeze-excitation width over ``dim`` (0.25).
        rel_pos_bias: relative-position tables in both attentions.
        qkv_bias: bias in the qkv projections.
        proj_drop: dropout after projections and in the MLPs.
        drop_path: stochastic depth of every residual branch.
        backend: ``attend`` backend, ``"auto"`` by default.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        partition_size=7,
        expand_ratio: float = 4.0,
        mlp_ratio: float = 4.0,
        se_ratio: float = 0.25,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        dim, num_heads = check_heads(dim, num_heads)
        mlp_ratio = check_ratio("mlp_ratio", mlp_ratio)
        drop_path = check_probability("drop_path", drop_path)
        self.dim = dim
        self.conv = MBConv(dim, expand_ratio, se_ratio, drop_path)
        args = (mlp_ratio, rel_pos_bias, qkv_bias, proj_drop, drop_path, backend)
        self.attn_block = _PartitionAttention(dim, num_heads, partition_size, "block", *args)
        self.attn_grid = _PartitionAttention(dim, num_heads, partition_size, "grid", *args)

    def pattern(self, grid):
        """``Window(grid, P) | Grid(grid, P)``: both stages' patterns in one picture (each attends with its own)."""
        return self.attn_block.attn.pattern(grid) | self.attn_grid.attn.pattern(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, H, W, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__, 4, "(batch, H, W, dim)")
        self.attn_block.attn._check_grid(tuple(x.shape[1:3]))  # refuse before any work
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.attn_grid(self.attn_block(x))
