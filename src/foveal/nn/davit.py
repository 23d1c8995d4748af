"""DaViT: channel group attention, and the dual (spatial window + channel) block, channels-last.

Ding et al., "DaViT: Dual Attention Vision Transformers" (ECCV 2022); module and
parameter names of timm's ``davit.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from foveal._checks import positive_int
from foveal.nn._common import (
    attend,
    cached_pattern,
    check_backend,
    check_bool,
    check_channels_last,
    check_heads,
    check_probability,
    check_ratio,
    drop_path,
    overridden_pattern,
)
from foveal.nn.mlp import Mlp
from foveal.patterns import Window

__all__ = [
    "channel_group_attention",
    "ChannelAttention",
    "ConvPosEnc",
    "SpatialBlock",
    "ChannelBlock",
    "DaViTBlock",
]


def channel_group_attention(query, key, value, scale: float):
    """Attention whose tokens are channels: ``value @ softmax(scale · queryᵀ key)ᵀ``.

    All three are (B, groups, N, Cg): per group, the Cg channels attend to each other
    with the N spatial positions as the "head dimension" — a (Cg × Cg) map, cost
    linear in N.
    """
    attn = torch.softmax((query * scale).transpose(-1, -2) @ key, dim=-1)  # (B, g, Cg, Cg)
    return value @ attn.transpose(-1, -2)


class ChannelAttention(nn.Module):
    """DaViT channel group attention: channels are the tokens, spatial positions the feature dimension.

    ``qkv`` gives q, k, v (B, N, C); the C channels split into ``num_heads`` groups of
    ``Cg = C / num_heads``. DaViT (``v2=False``, the paper and timm's
    ``ChannelAttention``): ``A = softmax((s·k)ᵀ v)`` over a group's channels,
    ``s = Cg^-0.5``, and ``out = q Aᵀ`` — the roles of q, k and v are permuted relative to
    token attention, a quirk kept as checkpoints expect it. ``v2=True`` (timm's
    ``ChannelAttentionV2``, DaViT in Florence-2): ``A = softmax((s·q)ᵀ k)``,
    ``out = v Aᵀ`` with ``s = N^-0.5`` (``dynamic_scale``) or ``Cg^-0.5``. Then ``proj``.
    Input and output are channels-last (B, *tokens, dim), any token layout: the
    result does not depend on where the tokens sit. Cost O(N·C²/heads), linear in N.
    Ding et al., "DaViT: Dual Attention Vision Transformers" (ECCV 2022).

    Parameters: ``dim``; ``num_heads`` (channel groups, must divide ``dim``); ``v2``;
    ``dynamic_scale`` (v2 only); ``qkv_bias``. State-dict keys: ``qkv``, ``proj``.
    """

    def __init__(
        self, dim: int, num_heads: int = 8, v2: bool = False, dynamic_scale: bool = True, qkv_bias: bool = False
    ):
        super().__init__()
        self.dim, self.num_heads = check_heads(dim, num_heads)
        self.head_dim = self.dim // self.num_heads
        self.v2, self.dynamic_scale = check_bool("v2", v2), check_bool("dynamic_scale", dynamic_scale)
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        self.qkv = nn.Linear(self.dim, 3 * self.dim, bias=qkv_bias)
        self.proj = nn.Linear(self.dim, self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, *tokens, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__, None, "(batch, *tokens, dim)")
        b, c = x.shape[0], x.shape[-1]
        n = math.prod(x.shape[1:-1])
        q, k, v = self.qkv(x.reshape(b, n, c)).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.v2:
            scale = n**-0.5 if self.dynamic_scale else self.head_dim**-0.5
            out = channel_group_attention(q, k, v, scale)
        else:
            out = channel_group_attention(k, v, q, self.head_dim**-0.5)
        return self.proj(out.transpose(1, 2).reshape(x.shape))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, v2={self.v2}"


class ConvPosEnc(nn.Module):
    """DaViT's convolutional position encoding: ``x + act(DWConv_k(x))`` on (B, H, W, dim), channels last.

    A depth-wise ``k×k`` conv with bias (``proj``), zero padding ``k // 2``; ``act`` adds a
    GELU. Not an attention module: it keeps timm's argument names (``k``, ``act``).
    Ding et al., "DaViT" (2022); Chu et al., "Conditional Positional Encodings" (2021).
    """

    def __init__(self, dim: int, k: int = 3, act: bool = False):
        super().__init__()
        dim, k = positive_int("dim", dim), positive_int("k", k)
        if k % 2 == 0:
            raise ValueError(f"k must be odd (the map keeps its size), got {k}")
        act = check_bool("act", act)
        self.dim = dim
        self.proj = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
        self.activation = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__)
        feat = self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.activation(feat)


class _WindowAttention(nn.Module):
    """DaViT's window attention (no relative position bias): ``attend`` over ``Window`` on (B, H, W, dim)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool, backend: str):
        super().__init__()
        self.dim, self.num_heads, self.window_size, self.backend = dim, num_heads, window_size, backend
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def pattern(self, grid) -> Window:
        """The ``Window`` pattern on ``grid`` padded up to whole windows (shared bounded cache).

        A ``pattern_override`` replaces it; it is then called on ``grid`` itself (no padding).
        """
        grid = tuple(int(g) for g in grid)
        swapped = overridden_pattern(self, grid)
        if swapped is not None:
            return swapped
        w = self.window_size
        return cached_pattern(Window, tuple(-(-g // w) * w for g in grid), w)

    def forward(self, x):
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if getattr(self, "pattern_override", None) is not None:
            pad_b = pad_r = 0  # the override's pattern is over the grid itself
        if pad_b or pad_r:  # as DaViT: zero tokens (after the norm) fill the last windows, then are cropped
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = x.shape[1:3]
        q, k, v = self.qkv(x).reshape(b, hp * wp, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attend(q, k, v, self.pattern((h, w)), scale=self.scale, backend=self.backend)
        out = self.proj(out.transpose(1, 2).reshape(b, hp, wp, c))
        return out[:, :h, :w] if pad_b or pad_r else out


class _DualHalf(nn.Module):
    """Half a DaViT block: ``cpe1`` → pre-norm ``attn`` + residual → ``cpe2`` → pre-norm ``mlp`` + residual."""

    def _init_half(self, mlp_ratio, ffn, cpe_act, drop_path, attn: nn.Module) -> None:
        self.drop_path = check_probability("drop_path", drop_path)
        mlp_ratio = check_ratio("mlp_ratio", mlp_ratio)
        ffn = check_bool("ffn", ffn)
        cpe_act = check_bool("cpe_act", cpe_act)
        self.cpe1 = ConvPosEnc(self.dim, 3, cpe_act)
        self.norm1 = nn.LayerNorm(self.dim)
        self.attn = attn
        self.cpe2 = ConvPosEnc(self.dim, 3, cpe_act)
        self.norm2 = nn.LayerNorm(self.dim) if ffn else None
        self.mlp = Mlp(self.dim, int(self.dim * mlp_ratio)) if ffn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, dim), channels last; returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__)
        x = self.cpe1(x)
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        x = self.cpe2(x)
        if self.mlp is not None:
            x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x


class SpatialBlock(_DualHalf):
    """DaViT spatial block: ``cpe1`` → pre-norm window attention + residual → ``cpe2`` → pre-norm MLP + residual.

    Window attention over non-overlapping ``window_size``² windows (``foveal.patterns.Window``
    through ``attend``, no relative position bias, as DaViT); a grid that is not a multiple
    of the window is padded with zero tokens after ``norm1`` (they take part as keys) and
    cropped, as in DaViT. Channels-last (B, H, W, dim). Ding et al., "DaViT" (ECCV 2022).
    Parameters: ``dim``, ``num_heads``, ``window_size`` (7), ``mlp_ratio`` (4),
    ``ffn`` (with MLP), ``cpe_act``, ``qkv_bias`` (True), ``drop_path``, ``backend``.
    """

    def __init__(
        self, dim, num_heads, window_size=7, mlp_ratio=4.0, ffn=True, cpe_act=False, qkv_bias=True, drop_path=0.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.dim, self.num_heads = check_heads(dim, num_heads)
        self.window_size = positive_int("window_size", window_size)
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        attn = _WindowAttention(self.dim, self.num_heads, self.window_size, qkv_bias, check_backend(backend))
        self._init_half(mlp_ratio, ffn, cpe_act, drop_path, attn)

    def pattern(self, grid) -> Window:
        """The ``Window`` pattern used on ``grid`` (after padding to whole windows)."""
        return self.attn.pattern(grid)


class ChannelBlock(_DualHalf):
    """DaViT channel block: ``cpe1`` → pre-norm channel attention + residual → ``cpe2`` → pre-norm MLP + residual.

    Channels-last (B, H, W, dim). Ding et al., "DaViT" (ECCV 2022). Parameters: ``dim``,
    ``num_heads``, ``mlp_ratio`` (4), ``ffn``, ``cpe_act``, ``v2`` (``ChannelAttention``'s
    variant), ``qkv_bias`` (True), ``drop_path``.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, ffn=True, cpe_act=False, v2=False, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.dim, self.num_heads = check_heads(dim, num_heads)
        attn = ChannelAttention(self.dim, self.num_heads, v2=v2, qkv_bias=qkv_bias)
        self._init_half(mlp_ratio, ffn, cpe_act, drop_path, attn)


class DaViTBlock(nn.Sequential):
    """DaViT dual attention block: a ``SpatialBlock`` (window attention) then a ``ChannelBlock`` (channel attention).

    Each half is conv position encoding → pre-norm attention with residual → conv
    position encoding → pre-norm MLP with residual; local interactions come from the
    windows, global ones from the channel attention (whose channel maps see every
    position). Channels-last (B, H, W, dim) in and out. Submodules ``0`` and ``1``, as
    timm's DaViT stages. Ding et al., "DaViT: Dual Attention Vision Transformers"
    (ECCV 2022).

    Parameters: ``dim``; ``num_heads`` (used by both halves; must divide ``dim``);
    ``window_size`` (7); ``mlp_ratio`` (4); ``ffn``; ``cpe_act``; ``v2`` (channel attention
    variant); ``qkv_bias`` (True); ``drop_path``; ``backend`` for the window attention.
    """

    def __init__(
        self, dim, num_heads, window_size=7, mlp_ratio=4.0, ffn=True, cpe_act=False, v2=False, qkv_bias=True,
        drop_path=0.0, backend: str = "auto",
    ):
        super().__init__(
            SpatialBlock(dim, num_heads, window_size, mlp_ratio, ffn, cpe_act, qkv_bias, drop_path, backend),
            ChannelBlock(dim, num_heads, mlp_ratio, ffn, cpe_act, v2, qkv_bias, drop_path),
        )

    def pattern(self, grid) -> Window:
        """The ``Window`` pattern of the spatial half on ``grid`` (padded to whole windows)."""
        return self[0].pattern(grid)
