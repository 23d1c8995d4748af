"""MaxViT: multi-axis attention (block + grid) and the MaxViT block, channels last, over ``attend``.

Block attention is attention within non-overlapping ``P × P`` windows (``Window(grid, P)``);
grid attention is attention among the ``P × P`` tokens spread over the whole image at
stride ``grid // P`` (``Grid(grid, P)``, MaxViT's ``grid_partition``). Both carry a
``(2P−1)²``-entry relative-position table per head; for grid attention the offsets are
counted in the partition's own coordinates, i.e. in units of the stride.
Tu et al., "MaxViT: Multi-Axis Vision Transformer" (ECCV 2022); timm ``maxxvit.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from foveal._checks import per_axis, positive_int
from foveal.bias import RelativePositionBias
from foveal.nn._common import (
    cached_pattern,
    check_backend,
    check_bool,
    check_channels_last,
    check_input,
    check_heads,
    check_no_attn_drop,
    check_probability,
    check_ratio,
    drop_path,
    init_attention,
    overridden_pattern,
)
from foveal.nn.mlp import Mlp
from foveal.nn.window import attend_channels_last, swin_table_bias
from foveal.patterns.local import Grid, Window

__all__ = ["MultiAxisAttention", "MBConv", "MaxViTBlock"]

_KINDS = ("block", "grid")


_REL_POS_TYPES = ("bias", "bias_tf", "mlp")
_ACTS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}


def _check_act(name: str, value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


class _RelPosBias(nn.Module):
    """timm's ``RelPosBias``: a Swin-layout table ``((2P0−1)(2P1−1), heads)``, rows by offset query − key."""

    def __init__(self, partition_size, num_heads):
        super().__init__()
        self.partition_size = partition_size
        rows = math.prod(2 * p - 1 for p in partition_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def bias(self, grid, step):
        return swin_table_bias(self.relative_position_bias_table, self.partition_size, grid, step=step)


class _RelPosBiasTf(nn.Module):
    """timm's ``RelPosBiasTf`` (the TensorFlow MaxViT): a table ``(heads, 2P0−1, 2P1−1)`` indexed by key − query."""

    def __init__(self, partition_size, num_heads):
        super().__init__()
        self.partition_size = partition_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_heads, *(2 * p - 1 for p in partition_size)))
        nn.init.normal_(self.relative_position_bias_table, std=0.02)

    def bias(self, grid, step):
        radius = tuple(p - 1 for p in self.partition_size)
        return RelativePositionBias(grid, radius, self.relative_position_bias_table, step=step)


class _RelPosMlp(nn.Module):
    """timm's ``RelPosMlp`` (``mode="cr"``, the ``maxvit_rmlp_*`` models): the table is an MLP of log offsets.

    ``table[Δ] = fc2(drop(ReLU(fc1(sign(Δ)·log(1 + |Δ|)))))`` for every offset ``Δ = query − key``
    inside the partition (dropout 0.125 after the ReLU, as timm); then used as ``_RelPosBias``.
    """

    def __init__(self, partition_size, num_heads, hidden_dim: int = 512):
        super().__init__()
        self.partition_size = partition_size
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(2, hidden_dim)
        self.mlp.act = nn.ReLU()
        self.mlp.drop1 = nn.Dropout(0.125)
        self.mlp.fc2 = nn.Linear(hidden_dim, num_heads)
        axes = [torch.arange(-(p - 1), p, dtype=torch.float32) for p in partition_size]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (2P0−1, 2P1−1, 2), offsets q − k
        self.register_buffer("rel_coords_log", torch.sign(coords) * torch.log1p(coords.abs()), persistent=False)

    def bias(self, grid, step):
        m = self.mlp
        table = m.fc2(m.drop1(m.act(m.fc1(self.rel_coords_log.to(m.fc1.weight.dtype)))))
        return swin_table_bias(table.reshape(-1, table.shape[-1]), self.partition_size, grid, step=step)


_REL_POS_CLASSES = {"bias": _RelPosBias, "bias_tf": _RelPosBiasTf, "mlp": _RelPosMlp}


class MultiAxisAttention(nn.Module):
    """MaxViT's block or grid attention with its relative-position bias, on (batch, H, W, dim).

    ``kind="block"``: each token attends to its ``P × P`` window; ``kind="grid"``: to the
    ``P × P`` tokens congruent to it modulo ``(H // P, W // P)``, a dilated, image-wide
    sparse grid. Softmax attention plus a learned per-head bias indexed by the relative
    position inside the partition (for grid attention counted in the partition's own
    coordinates, i.e. in units of the stride ``H // P``).

    Shapes: ``x`` is (batch, H, W, dim), channels last; H and W must be divisible by
    ``partition_size`` (MaxViT does not pad). Returns the same shape.

    Tu et al., "MaxViT: Multi-Axis Vision Transformer" (ECCV 2022). State dict as timm's
    ``AttentionCl``: ``qkv``, ``proj``, and the bias under ``rel_pos``, in one of timm's
    three forms (``rel_pos_type``): ``"bias"`` (``RelPosBias``: ``rel_pos.relative_position_bias_table``
    of shape ``((2P−1)², heads)``, rows in the order of the offset query − key, Swin's
    layout), ``"bias_tf"`` (``RelPosBiasTf`` of the ``*_tf`` ports: shape
    ``(heads, 2P−1, 2P−1)``, indexed by key − query) or ``"mlp"`` (``RelPosMlp`` of the
    ``maxvit_rmlp_*`` models: ``rel_pos.mlp.fc1/fc2``). A checkpoint of foveal < 0.2 with the
    table at ``relative_position_bias_table`` loads too.

    Parameters:
        dim: channels.
        num_heads: attention heads (MaxViT uses ``dim // 32``).
        partition_size: ``P`` (int or pair): the window of block attention, the grid
            of grid attention (MaxViT: 7 at 224²).
        kind: ``"block"`` or ``"grid"``.
        rel_pos_bias: learn the relative-position bias.
        rel_pos_type: its form, ``"bias"``, ``"bias_tf"`` or ``"mlp"`` (timm's ``rel_pos_type``).
        head_first: the qkv channels are ``(heads, 3, head_dim)`` (timm's ``head_first=True``,
            the ``*_rw`` models) instead of ``(3, heads, head_dim)`` (the ``*_tf`` ports).
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
        rel_pos_type: str = "bias",
        head_first: bool = False,
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
        if not isinstance(rel_pos_type, str) or rel_pos_type not in _REL_POS_TYPES:
            raise ValueError(f"rel_pos_type must be one of {_REL_POS_TYPES}, got {rel_pos_type!r}")
        self.partition_size = per_axis("partition_size", partition_size, 2)
        check_no_attn_drop(attn_drop)
        self.head_first = check_bool("head_first", head_first)
        self.kind, self.rel_pos_type = kind, rel_pos_type
        init_attention(self, dim, num_heads, qkv_bias, qk_scale, proj_drop, check_backend(backend))
        if check_bool("rel_pos_bias", rel_pos_bias):
            self.rel_pos = _REL_POS_CLASSES[rel_pos_type](self.partition_size, num_heads)
        else:
            self.rel_pos = None

    @property
    def relative_position_bias_table(self):
        """The learned table of ``rel_pos`` (None without one, or for ``rel_pos_type="mlp"``)."""
        return getattr(self.rel_pos, "relative_position_bias_table", None)

    def _check_grid(self, grid: tuple[int, ...]) -> None:
        for a, (g, p) in enumerate(zip(grid, self.partition_size)):
            if g % p:
                raise ValueError(
                    f"partition_size must divide the grid on every axis; grid[{a}]={g} is not divisible by "
                    f"partition_size[{a}]={p}"
                )

    def pattern(self, grid) -> Window | Grid:
        """``Window(grid, P)`` for block attention, ``Grid(grid, P)`` for grid attention (or the override)."""
        grid = tuple(int(g) for g in grid)
        swapped = overridden_pattern(self, grid)
        if swapped is not None:
            return swapped
        self._check_grid(grid)
        return cached_pattern(Window if self.kind == "block" else Grid, grid, self.partition_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, H, W, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__, 4, "(batch, H, W, dim)")
        grid = tuple(x.shape[1:3])
        pattern = self.pattern(grid)
        # grid attention: offsets in the partition's own coordinates (units of the stride)
        step = 1 if self.kind == "block" else tuple(max(1, g // p) for g, p in zip(grid, self.partition_size))
        bias = None if self.rel_pos is None else self.rel_pos.bias(grid, step)
        out = attend_channels_last(
            x, self.qkv, self.proj, self.num_heads, pattern, bias=bias, scale=self.scale, backend=self.backend,
            head_first=self.head_first,
        )
        return self.proj_drop(out)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = state_dict.pop(prefix + "relative_position_bias_table", None)  # foveal < 0.2 kept it here
        if old is not None:
            state_dict.setdefault(prefix + "rel_pos.relative_position_bias_table", old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, partition_size={self.partition_size}, kind={self.kind!r}, "
            f"rel_pos_type={self.rel_pos_type if self.rel_pos is not None else None!r}, head_first={self.head_first}"
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

    ``x + conv1x1(SE(act(BN(dwconv3x3(act(BN(conv1x1(BN(x)))))))))``: a pre-norm
    BatchNorm, a 1×1 expansion to ``expand_ratio · dim``, depth-wise 3×3, squeeze-
    excitation reducing to ``se_ratio · dim`` channels (SiLU inside), a 1×1 projection
    back to ``dim``, and the residual: timm's ``MbConvBlock`` at stride 1, whose state
    dict loads as timm saves it (``pre_norm``, ``conv1_1x1``, ``norm1``, ``conv2_kxk``,
    ``norm2``, ``se.fc1/fc2``, ``conv3_1x1``). Tu et al., "MaxViT" (2022); Sandler et al.,
    "MobileNetV2" (2018); Hu et al., "Squeeze-and-Excitation Networks" (2018).

    ``norm_eps``: the BatchNorms' epsilon (1e-5; the ``*_tf`` ports: 1e-3). ``act_layer``:
    ``"gelu"`` (the paper), ``"gelu_tanh"`` (the ``*_tf`` ports) or ``"silu"`` (the
    ``*_rw`` models). ``output_bias``: bias of the last 1×1 conv (the ``*_rw`` models have
    none). The ``*_tf`` ports' 'same' padding equals the symmetric padding 1 used here
    at stride 1, so it needs no flag. timm's ``*_rw`` SE width (1/16 of the expanded
    width) equals ``se_ratio=0.25`` at ``expand_ratio=4``.
    """

    def __init__(
        self,
        dim: int,
        expand_ratio: float = 4.0,
        se_ratio: float = 0.25,
        norm_eps: float = 1e-5,
        act_layer: str = "gelu",
        output_bias: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        dim = positive_int("dim", dim)
        expand_ratio = check_ratio("expand_ratio", expand_ratio)
        se_ratio = check_ratio("se_ratio", se_ratio)
        norm_eps = check_ratio("norm_eps", norm_eps)
        self.act_layer = _check_act("act_layer", act_layer, _ACTS)
        output_bias = check_bool("output_bias", output_bias)
        mid = max(1, int(round(dim * expand_ratio)))
        self.drop_path = check_probability("drop_path", drop_path)
        self.pre_norm = nn.BatchNorm2d(dim, eps=norm_eps)
        self.conv1_1x1 = nn.Conv2d(dim, mid, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid, eps=norm_eps)
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.norm2 = nn.BatchNorm2d(mid, eps=norm_eps)
        self.se = _SqueezeExcite(mid, max(1, int(se_ratio * dim)))
        self.conv3_1x1 = nn.Conv2d(mid, dim, 1, bias=output_bias)
        self.act = _ACTS[self.act_layer]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, dim, H, W), channels first; returns the same shape."""
        check_input("x", x, type(self).__name__)
        if x.dim() != 4 or x.shape[1] != self.pre_norm.num_features:
            raise ValueError(f"MBConv expects (batch, dim={self.pre_norm.num_features}, H, W), got {tuple(x.shape)}")
        y = self.conv1_1x1(self.pre_norm(x))
        y = self.act(self.norm1(y))
        y = self.act(self.norm2(self.conv2_kxk(y)))
        y = self.conv3_1x1(self.se(y))
        return x + drop_path(y, self.drop_path, self.training)


class _PartitionAttention(nn.Module):
    """Pre-norm residual block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (channels last).

    timm's ``PartitionAttentionCl`` without layer scale: ``norm1``, ``attn``, ``norm2``,
    ``mlp.fc1/fc2``; it takes the whole map (``attn`` partitions through its pattern).
    """

    def __init__(
        self, dim, num_heads, partition_size, kind, mlp_ratio, rel_pos_bias, rel_pos_type, head_first, norm_eps,
        act_layer, qkv_bias, proj_drop, drop_path, backend,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiAxisAttention(
            dim, num_heads, partition_size, kind, rel_pos_bias=rel_pos_bias, rel_pos_type=rel_pos_type,
            head_first=head_first, qkv_bias=qkv_bias, proj_drop=proj_drop, backend=backend,
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, max(1, int(dim * mlp_ratio)), _ACTS[act_layer], proj_drop)
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in (("mlp.0.", "mlp.fc1."), ("mlp.3.", "mlp.fc2.")):  # foveal < 0.2: an nn.Sequential
            for name in ("weight", "bias"):
                value = state_dict.pop(prefix + old + name, None)
                if value is not None:
                    state_dict.setdefault(prefix + new + name, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MaxViTBlock(nn.Module):
    """One MaxViT block: MBConv, then block attention + MLP, then grid attention + MLP, on (batch, H, W, dim).

    Local mixing by the convolution, local attention within ``P × P`` windows, and
    global, dilated attention among tokens ``H // P`` and ``W // P`` apart: every
    token reaches every other in one block at linear cost. Each attention stage is
    pre-norm (LayerNorm) with residuals, followed by a pre-norm MLP with residual.

    Shapes: ``x`` is (batch, H, W, dim), channels last, H and W divisible by
    ``partition_size``; returns the same shape. Stride 1 (no downsampling: use a
    separate stem/downsample between stages).

    Tu et al., "MaxViT: Multi-Axis Vision Transformer" (ECCV 2022). The state dict is
    timm's ``MaxxVitBlock`` at stride 1 (``conv``, ``attn_block``, ``attn_grid``, each with
    ``norm1``, ``attn.qkv``, ``attn.proj``, ``attn.rel_pos.*``, ``norm2``, ``mlp.fc1/fc2``).
    timm's variants: ``*_rw`` models ``head_first=True, norm_eps=1e-6,
    conv_act_layer="silu", conv_output_bias=False`` (``rel_pos_type="mlp"`` for
    ``maxvit_rmlp_*``); ``*_tf`` ports ``rel_pos_type="bias_tf", act_layer="gelu_tanh",
    conv_act_layer="gelu_tanh", conv_norm_eps=1e-3`` (LayerNorm eps 1e-5, the default).

    Parameters:
        dim: channels.
        num_heads: attention heads of both attentions (MaxViT: ``dim // 32``).
        partition_size: ``P``, window of block attention and grid of grid attention.
        expand_ratio: MBConv expansion (4).
        mlp_ratio: MLP hidden width over ``dim`` (4).
        se_ratio: squeeze-excitation width over ``dim`` (0.25).
        rel_pos_bias: relative-position bias in both attentions.
        rel_pos_type: its form (``MultiAxisAttention``): ``"bias"``, ``"bias_tf"``, ``"mlp"``.
        head_first: qkv channel layout ``(heads, 3, head_dim)`` (timm's ``*_rw`` models).
        norm_eps: the LayerNorms' epsilon (1e-5; timm's ``*_rw`` models 1e-6).
        act_layer: the MLPs' activation, ``"gelu"`` or ``"gelu_tanh"``.
        conv_norm_eps: the MBConv BatchNorms' epsilon (1e-5; ``*_tf``: 1e-3).
        conv_act_layer: the MBConv activation, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        conv_output_bias: bias of the MBConv's last 1×1 conv.
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
        rel_pos_type: str = "bias",
        head_first: bool = False,
        norm_eps: float = 1e-5,
        act_layer: str = "gelu",
        conv_norm_eps: float = 1e-5,
        conv_act_layer: str = "gelu",
        conv_output_bias: bool = True,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        dim, num_heads = check_heads(dim, num_heads)
        mlp_ratio = check_ratio("mlp_ratio", mlp_ratio)
        norm_eps = check_ratio("norm_eps", norm_eps)
        act_layer = _check_act("act_layer", act_layer, ("gelu", "gelu_tanh"))
        drop_path = check_probability("drop_path", drop_path)
        proj_drop = check_probability("proj_drop", proj_drop)
        conv_norm_eps = check_ratio("conv_norm_eps", conv_norm_eps)
        conv_act_layer = _check_act("conv_act_layer", conv_act_layer, _ACTS)
        conv_output_bias = check_bool("conv_output_bias", conv_output_bias)
        self.dim = dim
        self.conv = MBConv(dim, expand_ratio, se_ratio, conv_norm_eps, conv_act_layer, conv_output_bias, drop_path)
        args = (mlp_ratio, rel_pos_bias, rel_pos_type, head_first, norm_eps, act_layer, qkv_bias, proj_drop,
                drop_path, backend)
        self.attn_block = _PartitionAttention(dim, num_heads, partition_size, "block", *args)
        self.attn_grid = _PartitionAttention(dim, num_heads, partition_size, "grid", *args)

    def pattern(self, grid):
        """``Window(grid, P) | Grid(grid, P)``: both stages' patterns in one picture (each attends with its own)."""
        return self.attn_block.attn.pattern(grid) | self.attn_grid.attn.pattern(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, H, W, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__, 4, "(batch, H, W, dim)")
        if getattr(self.attn_block.attn, "pattern_override", None) is None:
            self.attn_block.attn._check_grid(tuple(x.shape[1:3]))  # refuse before any work
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.attn_grid(self.attn_block(x))
