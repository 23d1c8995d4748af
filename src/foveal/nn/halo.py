"""HaloNet blocked local self-attention with relative logits, over ``attend``.

Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual
Backbones" (CVPR 2021); parameter layout of timm's ``HaloAttn``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from foveal._checks import positive_int
from foveal.nn._common import (
    attend,
    cached_pattern,
    check_backend,
    check_bool,
    check_heads,
    check_input,
    overridden_pattern,
)
from foveal.patterns import Halo
from foveal.patterns.local import PaddedHalo

__all__ = ["HaloAttention", "PaddedHalo", "HaloRelativeLogits"]

_REL_POS = ("relative logits", None)
_BORDERS = ("zeros", "mask")


class HaloRelativeLogits:
    """Score term ``q_i·r^h[Δy] + q_i·r^w[Δx]`` (HaloNet's relative logits) for ``attend(..., bias=...)``.

    The logits depend on the query's content, so they are precomputed as two per-query
    tables, ``table_h`` and ``table_w`` of shape (heads', Nq, R): entry ``[h, i, r]`` is
    ``q_{h,i} · rel[r]`` for the relative offset ``Δ = r − (R − 1) // 2``
    (key coordinate minus query coordinate, in image coordinates). The bias contract has
    no batch index, so callers fold the batch into the heads (heads' = batch·heads). The
    query grid is ``grid``; keys live on ``kv_grid``, whose coordinate ``c`` is image
    coordinate ``c − kv_offset`` (``kv_offset = halo`` for the zero-padded key grid).
    ``parameters()`` returns the two tables, so the kernels send gradients through them
    to the queries and the embeddings. Offsets beyond the tables are clamped (such
    pairs are outside the halo and masked by the pattern).

    ``low`` (default ``−(R − 1) // 2``) is the offset of column 0. ``tile = (q_block,
    block)`` is timm's strided ``HaloAttn``: the query grid is the input subsampled, a tile
    of ``q_block`` queries per axis covers ``block`` input positions, and a query counts as
    sitting at ``tile start + its index in the tile`` (not at its input position: timm's
    relative-to-absolute shift works in tile indices, a quirk kept so checkpoints load).
    """

    def __init__(self, table_h, table_w, grid, kv_grid, kv_offset: int, low: int | None = None, tile=None):
        self.table_h, self.table_w = table_h, table_w
        self.width, self.kv_width = grid[1], kv_grid[1]
        self.kv_offset = kv_offset
        self.radius = (table_h.shape[-1] - 1) // 2
        self.low = -self.radius if low is None else low
        self.tile = tile
        self._spec = (tuple(grid), tuple(kv_grid), kv_offset, low, tile)

    def _query(self, c):
        if self.tile is None:
            return c
        q_block, block = self.tile
        return (c // q_block) * block + c % q_block

    def __call__(self, h, q_idx, kv_idx):
        qy, qx = self._query(q_idx // self.width), self._query(q_idx % self.width)
        ky = kv_idx // self.kv_width - self.kv_offset
        kx = kv_idx % self.kv_width - self.kv_offset
        top = self.table_h.shape[-1] - 1
        iy = (ky - qy - self.low).clamp(0, top)
        ix = (kx - qx - self.low).clamp(0, top)
        return self.table_h[h, q_idx, iy] + self.table_w[h, q_idx, ix]

    def parameters(self):
        return [self.table_h, self.table_w]

    def compile_spec(self):
        """``((HaloRelativeLogits, grid, kv_grid, kv_offset, low, tile), [table_h, table_w])`` for
        ``foveal.custom_op``: the tables go to the compiled op as tensors, their gradients flow."""
        return (HaloRelativeLogits, *self._spec), [self.table_h, self.table_w]

    @staticmethod
    def from_spec(rest, tensors):
        grid, kv_grid, kv_offset, low, tile = rest
        return HaloRelativeLogits(tensors[0], tensors[1], grid, kv_grid, kv_offset, low=low, tile=tile)

    def __repr__(self):
        return f"HaloRelativeLogits(heads={self.table_h.shape[0]}, radius={self.radius})"


class _PosEmbedRel(nn.Module):
    """The two relative-embedding tables of timm's ``PosEmbedRel`` (``height_rel``, ``width_rel``)."""

    def __init__(self, win_size: int, dim_head: int, scale: float):
        super().__init__()
        self.height_rel = nn.Parameter(torch.randn(2 * win_size - 1, dim_head) * scale)
        self.width_rel = nn.Parameter(torch.randn(2 * win_size - 1, dim_head) * scale)


class HaloAttention(nn.Module):
    """HaloNet attention: each ``block_size``² tile of queries attends to that tile grown by ``halo_size``.

    ``q = W_q x``, ``k, v = W_kv x`` (1×1 projections, ``num_heads`` heads); the query
    at ``i`` attends to the keys of its tile's halo window with scores
    ``q_i·k_j / sqrt(d) + q_i·r^h[Δy] + q_i·r^w[Δx]`` (relative logits,
    ``Δ = key − query`` per axis). The output is the heads' concatenated values
    (no output projection, as in timm's ``HaloAttn``). Input and output are
    channels-last (B, H, W, dim). Vaswani et al., "Scaling Local Self-Attention for
    Parameter Efficient Visual Backbones" (CVPR 2021).

    Borders (``border``): ``"zeros"`` (default, timm's behaviour) pads the projected keys
    and values with zeros by ``halo_size`` on every side; the padded keys are *not*
    masked — they take part in the softmax with score ``0 + relative logits`` and a zero
    value — so every query has exactly ``(block_size + 2·halo_size)²`` keys. This runs as
    exact attention over the ``PaddedHalo`` cross pattern (queries on the grid, keys on
    the padded grid). timm needs ``block_size`` to divide H and W; here a grid that it
    does not divide is padded the same way up to whole blocks (the extra keys are zero,
    like the border's, the extra queries are dropped), so the result on a divisible grid
    is timm's and any other grid runs too.
    ``"mask"`` uses foveal's ``Halo`` pattern, which clips the halo at the borders (no
    padded keys; any grid; the last tile may be smaller); only then can
    ``foveal.nn._common.set_pattern_override`` swap the pattern (keys are the query grid).

    Relative logits are a score term (``HaloRelativeLogits``) passed to ``attend``:
    per-query tables of ``q·r`` for every offset, gathered per pair, with the batch
    folded into the heads. The embeddings have timm's shape ``(2·win − 1, dim_head)``,
    ``win = block_size + 2·halo_size``, indexed as timm's relative-to-absolute shift
    does: offset ``Δ`` reads row ``Δ + win − 1 + halo_size`` (the first ``2·halo_size``
    rows are never read — a quirk kept so timm checkpoints load). They are shared by
    all heads, unscaled unless ``scale_pos_embed`` (then the whole score is scaled).

    Parameters: ``dim`` (= output dim); ``num_heads`` (8; must divide ``dim``);
    ``block_size`` (8); ``halo_size`` (3); ``rel_pos`` (``"relative logits"`` or
    ``None``); ``border`` (``"zeros"`` or ``"mask"``); ``scale_pos_embed`` (timm's flag);
    ``qkv_bias`` (False, as timm); ``backend`` for ``attend``. ``stride`` (1 or a divisor of
    ``block_size``, with ``border="zeros"``): timm's strided ``HaloAttn`` — the queries are
    the input subsampled by ``stride`` (its 1×1 conv of stride ``stride``), each tile of
    ``block_size / stride`` queries per axis keeps its input tile's key window, the output is
    (B, ceil(H / stride), ceil(W / stride), dim); the relative logits keep timm's tile-index
    offsets (``HaloRelativeLogits``' ``tile``). State-dict keys as timm's ``HaloAttn``:
    ``q``, ``kv`` (1×1 ``Conv2d``; ``kv`` holds each head's keys then values),
    ``pos_embed.height_rel``, ``pos_embed.width_rel``. timm's ``dim_head``/``qk_ratio`` and
    ``avg_down`` (average pooling instead of a strided query) are not offered.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        block_size: int = 8,
        halo_size: int = 3,
        stride: int = 1,
        rel_pos: str | None = "relative logits",
        border: str = "zeros",
        scale_pos_embed: bool = False,
        qkv_bias: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        dim, num_heads = check_heads(dim, num_heads)
        self.block_size = positive_int("block_size", block_size)
        self.halo_size = positive_int("halo_size", halo_size, minimum=0)
        self.stride = positive_int("stride", stride)
        if self.block_size % self.stride:
            raise ValueError(
                f"stride must divide block_size (timm average-pools otherwise, which is not offered), "
                f"got stride={stride} and block_size={block_size}"
            )
        if not (rel_pos is None or isinstance(rel_pos, str)) or rel_pos not in _REL_POS:
            raise ValueError(f"rel_pos must be one of {_REL_POS}, got {rel_pos!r}")
        if not isinstance(border, str) or border not in _BORDERS:
            raise ValueError(f"border must be one of {_BORDERS}, got {border!r}")
        if border == "mask" and self.stride != 1:
            raise ValueError(f"stride={stride} needs border='zeros' (timm's strided HaloAttn), got border='mask'")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.win_size = self.block_size + 2 * self.halo_size
        self.scale = self.head_dim**-0.5
        self.rel_pos, self.border = rel_pos, border
        self.scale_pos_embed = check_bool("scale_pos_embed", scale_pos_embed)
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        self.backend = check_backend(backend)
        self.q = nn.Conv2d(dim, dim, 1, bias=qkv_bias)
        self.kv = nn.Conv2d(dim, 2 * dim, 1, bias=qkv_bias)
        if rel_pos is not None:
            self.pos_embed = _PosEmbedRel(self.win_size, self.head_dim, self.scale)
        else:
            self.pos_embed = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's initialisation: fan-in truncated normal projections, tables with std ``dim_head**-0.5``."""
        std = self.dim**-0.5
        nn.init.trunc_normal_(self.q.weight, std=std)
        nn.init.trunc_normal_(self.kv.weight, std=std)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed.height_rel, std=self.scale)
            nn.init.trunc_normal_(self.pos_embed.width_rel, std=self.scale)

    def pattern(self, grid):
        """The pattern used on ``grid`` (shared bounded cache): ``PaddedHalo`` for zeros, ``Halo`` for mask.

        For ``"zeros"`` the query grid is ``grid`` padded up to whole blocks. For ``"mask"``
        a ``pattern_override`` replaces it.
        """
        grid = tuple(int(g) for g in grid)
        if self.border == "zeros":
            b, s = self.block_size, self.stride
            grid = tuple(-(-g // b) * b // s for g in grid)  # the query grid: whole blocks, subsampled
            return cached_pattern(PaddedHalo, grid, b, self.halo_size, s)
        swapped = overridden_pattern(self, grid)
        if swapped is not None:
            return swapped
        return cached_pattern(Halo, grid, self.block_size, self.halo_size)

    def _check(self, x):
        check_input("x", x, type(self).__name__)
        if x.dim() != 4:
            raise ValueError(f"x must be (batch, height, width, dim), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} channels but dim is {self.dim}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, dim), channels last; returns the same shape."""
        self._check(x)
        b, h, w, c = x.shape
        nh, d, halo = self.num_heads, self.head_dim, self.halo_size
        if self.border == "zeros" and getattr(self, "pattern_override", None) is not None:
            raise ValueError("a pattern_override needs border='mask' (with 'zeros' the keys are the padded grid)")
        pattern = self.pattern((h, w))
        st = self.stride
        xq = x[:, ::st, ::st] if st > 1 else x  # a 1×1 conv of stride s: the input subsampled
        ho, wo = xq.shape[1:3]
        q = F.linear(xq, self.q.weight.flatten(1), self.q.bias).reshape(b, ho, wo, nh, d)
        kv = F.linear(x, self.kv.weight.flatten(1), self.kv.bias).reshape(b, h, w, nh, 2, d)
        k, v = kv.unbind(4)  # (B, H, W, heads, d): each head's channels are [keys, values], as timm
        hq, wq = h, w
        if self.border == "zeros":
            hq, wq = pattern.shape  # whole blocks: timm's grid, or the grid padded up to them
            ph, pw = hq * st - h, wq * st - w
            if (hq, wq) != (ho, wo):
                q = F.pad(q, (0, 0, 0, 0, 0, wq - wo, 0, hq - ho))
            k, v = (F.pad(t, (0, 0, 0, 0, halo, halo + pw, halo, halo + ph)) for t in (k, v))
        q = q.reshape(b, hq * wq, nh, d).transpose(1, 2)
        kv_grid = k.shape[1:3]
        k, v = (t.reshape(b, -1, nh, d).transpose(1, 2) for t in (k, v))
        if self.pos_embed is None:
            out = attend(q, k, v, pattern, scale=self.scale, backend=self.backend)
        else:
            # the score term has no batch index: fold the batch into the heads
            qf, kf, vf = (t.reshape(1, b * nh, -1, d) for t in (q, k, v))
            bias = self._relative_logits(qf[0], (hq, wq), kv_grid)
            out = attend(qf, kf, vf, pattern, bias=bias, scale=self.scale, backend=self.backend)
        out = out.reshape(b, nh, hq, wq, d)[:, :, :ho, :wo]
        return out.permute(0, 2, 3, 1, 4).reshape(b, ho, wo, c)

    def _relative_logits(self, q: torch.Tensor, grid, kv_grid) -> HaloRelativeLogits:
        """Per-query tables ``q·r`` for offsets ``|Δ| <= block_size + halo_size − 1`` (the reachable ones)."""
        # offsets key − query from −(halo + q_block − 1) to block + halo − 1 (q_block = block // stride); offset Δ
        # reads timm's row Δ + win − 1 + halo, so the first rows are never read
        q_block = self.block_size // self.stride
        first = self.win_size - q_block  # timm row of the most negative reachable offset (2·halo at stride 1)
        rel_h, rel_w = self.pos_embed.height_rel[first:], self.pos_embed.width_rel[first:]
        table_h, table_w = q @ rel_h.to(q.dtype).T, q @ rel_w.to(q.dtype).T  # (B·heads, N, block + 2·halo + q_block − 1)
        if self.scale_pos_embed:
            table_h, table_w = table_h * self.scale, table_w * self.scale
        offset = self.halo_size if self.border == "zeros" else 0
        tile = (q_block, self.block_size) if self.stride > 1 else None
        return HaloRelativeLogits(table_h, table_w, grid, kv_grid, offset, low=-(self.halo_size + q_block - 1), tile=tile)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, block_size={self.block_size}, "
            f"halo_size={self.halo_size}, stride={self.stride}, rel_pos={self.rel_pos!r}, border={self.border!r}"
        )
