"""DCAL: global-local cross attention (GLCA) and pair-wise cross attention (PWCA).

GLCA lets the few patch tokens with the highest accumulated attention from the CLS
token (attention rollout over the previous layers) attend, as queries, to all keys
and values; PWCA, used only in training, lets the queries of an image attend to the
keys and values of the image and of a distractor image together. Both are ``attend``
over a ``Full`` cross pattern (``n_q != n_kv``).
Zhu et al., "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and
Object Re-Identification" (CVPR 2022). No official code; written from the paper.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from foveal._checks import positive_int
from foveal.nn._common import attend, cached_pattern, check_input, init_attention
from foveal.patterns import Full

__all__ = ["GlobalLocalCrossAttention", "PairwiseCrossAttention", "attention_rollout", "select_top"]


def attention_rollout(attn_maps: Sequence[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """The CLS row of the attention rollout ``Ŝ = S̄_L ⋯ S̄_1``, ``S̄_l = (1−residual)·A_l + residual·I``.

    ``attn_maps`` are the attention probabilities of the layers so far, first layer
    first, each (B, H, N, N) (averaged over heads, as rollout does) or (B, N, N); token 0
    is CLS. Returns (B, N): row 0 of the rollout. Computed as a row vector times the
    maps, last layer first, so no N×N product is formed beyond the given maps.
    Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (2020); DCAL eq. (3)
    with ``residual = 0.5``.
    """
    maps = _check_maps(attn_maps)
    residual = _unit_float("residual", residual, closed=True)
    b, n = maps[0].shape[0], maps[0].shape[-1]
    r = torch.zeros(b, n, dtype=torch.float32, device=maps[0].device)
    r[:, 0] = 1.0
    for a in reversed(maps):
        a = a.float()
        ra = torch.einsum("bn,bnm->bm", r, a) if a.dim() == 3 else torch.einsum("bn,bhnm->bm", r, a) / a.shape[1]
        r = residual * r + (1.0 - residual) * ra
    return r


def select_top(scores: torch.Tensor, count: int, include_cls: bool = True) -> torch.Tensor:
    """Indices (B, count [+1]) of the ``count`` patch tokens (1..N−1) with the highest ``scores`` (B, N).

    With ``include_cls`` the CLS token (index 0) is added. Indices come back in
    ascending token order.
    """
    top = torch.topk(scores[:, 1:], count, dim=1).indices + 1
    if include_cls:
        top = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)
    return top.sort(dim=1).values


def _unit_float(name: str, value, closed: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not (0.0 <= value <= 1.0 if closed else 0.0 < value <= 1.0):
        interval = "[0, 1]" if closed else "(0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _check_maps(attn_maps) -> list[torch.Tensor]:
    if isinstance(attn_maps, torch.Tensor) or not isinstance(attn_maps, Sequence) or len(attn_maps) == 0:
        raise TypeError(
            f"attn_maps must be a non-empty list of attention maps (B, H, N, N) or (B, N, N), "
            f"got {type(attn_maps).__name__}"
        )
    maps = list(attn_maps)
    first = maps[0]
    for i, a in enumerate(maps):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"attn_maps[{i}] must be a torch.Tensor (B, H, N, N) or (B, N, N), got {type(a).__name__}")
        if a.dim() not in (3, 4) or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attn_maps[{i}] must be (B, H, N, N) or (B, N, N), got {tuple(a.shape)}")
        if a.shape[0] != first.shape[0] or a.shape[-1] != first.shape[-1]:
            raise ValueError(
                f"attn_maps[{i}] has shape {tuple(a.shape)} but attn_maps[0] has {tuple(first.shape)}: "
                "batch and token counts must agree"
            )
    return maps


def _check_tokens(module: nn.Module, name: str, x) -> None:
    check_input(name, x, type(module).__name__)
    if x.dim() != 3:
        raise ValueError(f"{type(module).__name__} expects {name} of shape (batch, tokens, dim), got {tuple(x.shape)}")
    if x.shape[-1] != module.dim:
        raise ValueError(f"{name} has {x.shape[-1]} channels but dim is {module.dim}")


class _Attention(nn.Module):
    """Shared parts: timm-style ``qkv`` and ``proj`` (a timm ``Attention`` state dict loads)."""

    def __init__(self, dim, num_heads, qkv_bias, qk_scale, proj_drop, backend):
        super().__init__()
        init_attention(self, dim, num_heads, qkv_bias, qk_scale, proj_drop, backend)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, pattern) -> torch.Tensor:
        """``proj(attend(q, k, v))`` for (B, N, dim) projections, split into heads and merged back."""
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        o = attend(q, k, v, pattern, scale=self.scale, backend=self.backend)
        b, _, n, _ = o.shape
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, self.dim)))


class GlobalLocalCrossAttention(_Attention):
    """DCAL's global-local cross attention: the top-R rollout tokens attend to all tokens.

    The CLS row of the attention rollout of the previous layers (``attention_rollout``:
    ``Π_l (0.5·A_l + 0.5·I)``, heads averaged) ranks the patch tokens; the ``R`` highest
    (``R = max(1, round(top_ratio · (N − 1)))``, plus CLS when ``include_cls``) give the
    local queries ``Q^l``, which attend to the keys and values of all ``N`` tokens:
    ``softmax(Q^l K^gᵀ / sqrt(d)) V^g``, then ``proj``. The output has the input's
    shape: the selected tokens carry the attention output, every other token is passed
    through unchanged; ``return_index=True`` also returns the selected indices (B, R')
    so that a block can keep only those rows (``out.gather(1, ...)``), as DCAL's GLCA
    branch does.

    Shapes: ``x`` (B, N, dim) with the CLS token at index 0; either ``attn_maps`` (a
    list of (B, H, N, N) or (B, N, N) attention maps of the previous layers, first layer
    first) or ``rollout`` ((B, N) CLS-row scores, or a full (B, N, N) rollout whose row
    0 is used). Returns (B, N, dim) (and (B, R') indices, ascending).

    Zhu et al., "Dual Cross-Attention Learning for Fine-Grained Visual Categorization
    and Object Re-Identification" (CVPR 2022): ``top_ratio`` 0.1 for fine-grained
    recognition, 0.3 for re-identification. ``include_cls`` (default True) is a choice
    (the paper's GLCA branch classifies from its CLS token); ``residual`` 0.5 is the
    paper's ``0.5·A + 0.5·I``.

    Parameters: ``dim``, ``num_heads``, ``top_ratio``, ``include_cls``, ``residual``,
    ``qkv_bias``, ``qk_scale`` (default ``head_dim**-0.5``), ``proj_drop``, ``backend``
    for ``attend``. There is no ``attn_drop``: ``attend`` has no attention dropout.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        top_ratio: float = 0.1,
        include_cls: bool = True,
        residual: float = 0.5,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, proj_drop, backend)
        self.top_ratio = _unit_float("top_ratio", top_ratio)
        self.residual = _unit_float("residual", residual, closed=True)
        if not isinstance(include_cls, bool):
            raise TypeError(f"include_cls must be a bool, got {include_cls!r}")
        self.include_cls = include_cls

    def num_selected(self, n: int) -> int:
        """``R``: how many patch tokens of ``n`` tokens (CLS included) become queries."""
        return max(1, int(round(self.top_ratio * (n - 1))))

    def pattern(self, n: int) -> Full:
        """The pattern on ``n`` tokens: the ``R'`` selected queries against all ``n`` keys."""
        n = positive_int("n", n, minimum=2)
        return cached_pattern(Full, self.num_selected(n) + int(self.include_cls), n_kv=n)

    def forward(self, x, attn_maps=None, *, rollout=None, return_index: bool = False):
        """``x`` (B, N, dim); ``attn_maps`` or ``rollout`` rank the tokens; returns (B, N, dim) (, index)."""
        _check_tokens(self, "x", x)
        b, n, c = x.shape
        if n < 2:
            raise ValueError(f"x must have a CLS token and at least one patch token, got {n} tokens")
        scores = self._scores(b, n, attn_maps, rollout)
        index = select_top(scores.to(x.device), self.num_selected(n), self.include_cls)
        qkv = self.qkv(x)
        q = torch.gather(qkv[..., :c], 1, index[..., None].expand(-1, -1, c))
        k, v = qkv[..., c : 2 * c], qkv[..., 2 * c :]
        pattern = cached_pattern(Full, index.shape[1], n_kv=n)
        out = torch.scatter(x, 1, index[..., None].expand(-1, -1, c), self._attend(q, k, v, pattern).to(x.dtype))
        return (out, index) if return_index else out

    def _scores(self, b: int, n: int, attn_maps, rollout) -> torch.Tensor:
        if (attn_maps is None) == (rollout is None):
            raise ValueError("give exactly one of attn_maps (previous layers' attention maps) and rollout")
        if attn_maps is not None:
            maps = _check_maps(attn_maps)
            if maps[0].shape[0] != b or maps[0].shape[-1] != n:
                raise ValueError(
                    f"attn_maps are {tuple(maps[0].shape)} but x has batch {b} and {n} tokens"
                )
            return attention_rollout(maps, self.residual)
        if not isinstance(rollout, torch.Tensor):
            raise TypeError(f"rollout must be a tensor (B, N) or (B, N, N), got {type(rollout).__name__}")
        if rollout.dim() == 3 and tuple(rollout.shape) == (b, n, n):
            return rollout[:, 0]
        if tuple(rollout.shape) != (b, n):
            raise ValueError(f"rollout must have shape ({b}, {n}) or ({b}, {n}, {n}), got {tuple(rollout.shape)}")
        return rollout

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, top_ratio={self.top_ratio}, "
            f"include_cls={self.include_cls}, residual={self.residual}"
        )


class PairwiseCrossAttention(_Attention):
    """DCAL's pair-wise cross attention: in training, queries see the keys of two images.

    In training with ``x_pair`` given, the queries of ``x`` attend to the concatenated
    keys and values of ``x`` and ``x_pair`` (a distractor image, e.g. another image of
    the batch), ``softmax(Q_1 [K_1; K_2]ᵀ / sqrt(d)) [V_1; V_2]``, then ``proj``; in eval
    mode, or without ``x_pair``, it is plain self-attention of ``x`` (PWCA is removed at
    inference). ``qkv`` and ``proj`` are shared by both images, as DCAL shares PWCA's
    weights with the self-attention branch; a timm ``Attention`` state dict loads.

    Shapes: ``x`` (B, N, dim), ``x_pair`` (B, N2, dim); returns (B, N, dim).

    Zhu et al., "Dual Cross-Attention Learning for Fine-Grained Visual Categorization
    and Object Re-Identification" (CVPR 2022).

    Parameters: ``dim``, ``num_heads``, ``qkv_bias``, ``qk_scale`` (default
    ``head_dim**-0.5``), ``proj_drop``, ``backend`` for ``attend``. There is no
    ``attn_drop``: ``attend`` has no attention dropout.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, proj_drop, backend)

    def pattern(self, n: int, n_pair: int | None = None) -> Full:
        """The pattern: ``n`` queries against ``n + n_pair`` keys (``Full(n)`` without a pair)."""
        n = positive_int("n", n)
        if n_pair is None:
            return cached_pattern(Full, n)
        return cached_pattern(Full, n, n_kv=n + positive_int("n_pair", n_pair))

    def forward(self, x: torch.Tensor, x_pair: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, N, dim); ``x_pair`` (B, N2, dim), used only in training; returns (B, N, dim)."""
        _check_tokens(self, "x", x)
        b, n, c = x.shape
        use_pair = x_pair is not None and self.training
        if x_pair is not None:
            _check_tokens(self, "x_pair", x_pair)
            if x_pair.shape[0] != b:
                raise ValueError(f"x_pair must have the batch size of x ({b}), got {x_pair.shape[0]}")
            if x_pair.dtype != x.dtype or x_pair.device != x.device:
                raise ValueError(
                    f"x_pair must match x in dtype and device ({x.dtype}, {x.device}), "
                    f"got {x_pair.dtype}, {x_pair.device}"
                )
        q, k, v = self.qkv(x).split(c, dim=-1)
        if use_pair:
            w, bias = self.qkv.weight[c:], None if self.qkv.bias is None else self.qkv.bias[c:]
            k2, v2 = F.linear(x_pair, w, bias).split(c, dim=-1)
            k, v = torch.cat([k, k2], dim=1), torch.cat([v, v2], dim=1)
        pattern = self.pattern(n, x_pair.shape[1] if use_pair else None)
        return self._attend(q, k, v, pattern)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
