"""A tiny transformer whose attention runs under a foveal pattern, for the language-model quality benchmark.

Token embedding → ``depth`` pre-norm blocks (pattern attention with rotary positions, MLP)
→ linear head, all through ``foveal.functional.attend`` (as ``foveal.nn`` calls it: opaque to
``torch.compile``) so the pattern is the only thing
that differs between contenders. ``EncoderDecoder`` adds a cross-attention block whose
pattern is a cross pattern (``n_q != n_kv`` allowed). ``AttentionOnly`` is the one-layer
multi-head softmax attention used for in-context linear regression.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from foveal.nn._common import attend
from foveal.patterns import Pattern

__all__ = ["rotary", "TinyLM", "EncoderDecoder", "AttentionOnly"]

PatternFn = Callable[[int], Pattern]


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (Su et al., RoFormer 2021) of ``x`` (B, H, N, D) at ``positions`` (N,)."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half :]], dim=-1)


class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``memory`` (itself when None) under a pattern, rotary on q and k."""

    def __init__(self, dim: int, heads: int, use_rotary: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got {dim} and {heads}")
        self.heads, self.use_rotary = heads, use_rotary
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, pattern: Pattern, memory=None):
        memory = x if memory is None else memory
        b, n, c = x.shape
        m = memory.shape[1]
        q = self.q(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(memory).reshape(b, m, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.use_rotary:
            # bottom-right alignment, as the cross patterns: query i sits at key position i + m − n
            q = rotary(q, torch.arange(n, device=x.device) + (m - n))
            k = rotary(k, torch.arange(m, device=x.device))
        out = attend(q, k, v, pattern)
        return self.out(out.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, cross: bool = False):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.cross = Attention(dim, heads) if cross else None
        self.norm_c = nn.LayerNorm(dim) if cross else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, pattern, memory=None, cross_pattern=None):
        x = x + self.attn(self.norm1(x), pattern)
        if self.cross is not None:
            x = x + self.cross(self.norm_c(x), cross_pattern, memory)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token model: ``(B, N)`` token ids → ``(B, N, vocab)`` logits; self-attention under ``pattern_fn(N)``."""

    def __init__(self, vocab: int, pattern_fn: PatternFn, dim: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        self.pattern_fn = pattern_fn
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens):
        pattern = self.pattern_fn(tokens.shape[1])
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, pattern)
        return self.head(self.norm(x))


class EncoderDecoder(nn.Module):
    """Sequence to sequence: ``(src (B, M), tgt_len)`` → ``(B, tgt_len, vocab)``.

    The encoder is non-causal full attention; the decoder's queries are learned position
    embeddings (no target tokens are fed in) that attend to themselves fully and to the
    encoder under ``cross_fn(tgt_len, M)`` — the pattern under test.
    """

    def __init__(self, vocab: int, cross_fn, dim: int = 64, depth: int = 2, heads: int = 4, max_len: int = 4096):
        super().__init__()
        from foveal.patterns import Full

        self.cross_fn, self._full = cross_fn, Full
        self.embed = nn.Embedding(vocab, dim)
        self.queries = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.encoder = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.decoder = nn.ModuleList(_Block(dim, heads, cross=True) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, src, tgt_len: int):
        m = src.shape[1]
        x = self.embed(src)
        for block in self.encoder:
            x = block(x, self._full(m))
        y = self.queries[:tgt_len].expand(src.shape[0], -1, -1)
        cross = self.cross_fn(tgt_len, m)
        for block in self.decoder:
            y = block(y, self._full(tgt_len), memory=x, cross_pattern=cross)
        return self.head(self.norm(y))


class AttentionOnly(nn.Module):
    """One layer of multi-head softmax attention with a residual, read out at the last token.

    In-context linear regression (Garg et al. 2022; von Oswald et al. 2023): tokens are
    ``(B, N, d + 1)`` rows ``[x_i, y_i]`` with the query's ``y`` zeroed; the prediction is
    the last channel of the last token after one attention layer under ``pattern_fn(N)``.
    """

    def __init__(self, dim: int, heads: int, pattern_fn: PatternFn, width: int = 64):
        super().__init__()
        self.pattern_fn, self.heads = pattern_fn, heads
        self.inp = nn.Linear(dim, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, 1)

    def forward(self, tokens):
        b, n, _ = tokens.shape
        h = self.inp(tokens)
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = attend(q, k, v, self.pattern_fn(n)).transpose(1, 2).reshape(b, n, -1)
        return self.out(h + a)[:, -1, 0]
