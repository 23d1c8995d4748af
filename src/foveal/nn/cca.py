"""Core context aware attention (CCA-Attention): pooled core tokens plus a local window, one softmax.

Chen et al., "Core Context Aware Transformers for Long Context Language Modeling" (2025;
arXiv 2412.12465). The sequence is cut into groups of ``g`` tokens; each complete group
is pooled into one core key and value, weighted by the softmax of its last token's
query against the group's keys (globality-aware pooling). Query ``t`` attends jointly,
in one softmax, to the raw keys ``t − ℓ(t) < j ≤ t`` with ``ℓ(t) = ((t+1) mod g) + s``
(locality-preserving window) and to the core tokens of the groups that lie wholly
before that window, ``c ≤ floor((t − (g−1) − s) / g)``. In foveal the core tokens are
extra keys given to ``attend`` ahead of the raw keys, under an analytic cross pattern.
"""

from __future__ import annotations

import torch
from torch import nn

from foveal._checks import positive_int
from foveal.nn._common import attend, cached_pattern, check_bool, check_channels_last, init_attention
from foveal.patterns.algebra import Union
from foveal.patterns.global_ import FlatPattern, _like

__all__ = ["CoreContextAttention", "cca_core_tokens", "cca_pattern"]


class _CoreKeys(FlatPattern):
    """Query ``t`` sees core keys ``0 .. floor((t − (g−1) − s) / g)`` among the first ``groups`` keys."""

    def __init__(self, n, groups: int, group_size: int, window: int):
        self._init_shape(n, n + groups)
        self._set(groups=groups, group_size=group_size, window=window)

    def progression(self, axis, x):
        last = torch.div(x - (self.group_size - 1) - self.window, self.group_size, rounding_mode="floor")
        return _like(x, 0), _like(x, 1), torch.clamp(last + 1, 0, self.groups)

    def _key(self):
        return (self.shape, self.groups, self.group_size, self.window)

    def __repr__(self):
        return f"CoreKeys(n={self.n}, groups={self.groups}, group_size={self.group_size}, window={self.window})"


class _LocalKeys(FlatPattern):
    """Query ``t`` sees raw keys ``t − ℓ(t) < j ≤ t``, ``ℓ(t) = ((t+1) mod g) + s`` (stored after the cores)."""

    def __init__(self, n, groups: int, group_size: int, window: int):
        self._init_shape(n, n + groups)
        self._set(groups=groups, group_size=group_size, window=window)

    def progression(self, axis, x):
        reach = (x + 1) % self.group_size + self.window
        first = torch.clamp(x - reach + 1, min=0)
        return first + self.groups, _like(x, 1), x - first + 1

    def _key(self):
        return (self.shape, self.groups, self.group_size, self.window)

    def __repr__(self):
        return f"LocalKeys(n={self.n}, groups={self.groups}, group_size={self.group_size}, window={self.window})"


def cca_pattern(n: int, group_size: int, window_size: int) -> Union:
    """The cross pattern of CCA on ``n`` tokens: ``n`` queries, ``n // group_size`` core keys then ``n`` raw keys.

    ``window_size`` is the paper's local reach ``s``.
    """
    n = positive_int("n", n)
    group_size = positive_int("group_size", group_size)
    window_size = positive_int("window_size", window_size, minimum=0)
    groups = n // group_size
    local = _LocalKeys(n, groups, group_size, window_size)
    return Union(_CoreKeys(n, groups, group_size, window_size), local) if groups else local


def cca_core_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, scale: float):
    """Core keys and values (B, H, n // g, D) of the complete groups of ``g`` tokens.

    Group ``c``'s core key (value) is its keys (values) weighted by
    ``softmax(scale · q_last · K_cᵀ)``, ``q_last`` the query of the group's last token;
    the weights are computed in float32. ``q``, ``k``, ``v`` are (B, H, n, D).
    """
    b, h, n, d = k.shape
    groups = n // group_size
    m = groups * group_size
    kg = k[:, :, :m].reshape(b, h, groups, group_size, d)
    vg = v[:, :, :m].reshape(b, h, groups, group_size, v.shape[-1])
    q_last = q[:, :, group_size - 1 : m : group_size]  # (B, H, G, D)
    logits = torch.einsum("bhgd,bhgjd->bhgj", q_last.float(), kg.float()) * scale
    w = torch.softmax(logits, dim=-1)
    core_k = torch.einsum("bhgj,bhgjd->bhgd", w, kg.float()).to(k.dtype)
    core_v = torch.einsum("bhgj,bhgjd->bhgd", w, vg.float()).to(v.dtype)
    return core_k, core_v


class CoreContextAttention(nn.Module):
    """CCA-Attention over a sequence: one softmax over pooled core tokens and a local causal window.

    Each complete group of ``group_size`` tokens becomes one core key/value (globality-aware
    pooling weighted by its last token's query); token ``t`` attends to the raw keys of its
    locality window (``((t+1) mod group_size) + window_size`` tokens back, itself included) and to
    the core tokens of all earlier groups outside that window, in a single ``attend`` call
    whose keys are ``[core; raw]``. Input and output are (batch, tokens, dim).

    Chen et al., "Core Context Aware Transformers for Long Context Language Modeling" (2025).

    Parameters: ``dim`` channels; ``num_heads`` heads (``dim`` divisible by it);
    ``group_size`` tokens per core token (16, the paper's g); ``window_size`` the local reach
    s (1024, the paper's); ``causal`` must be True (CCA is defined for causal language
    modelling); ``qkv_bias``; ``qk_scale`` (default ``head_dim ** -0.5``); ``proj_drop``;
    ``backend`` as in ``attend``.
    """

    def __init__(self, dim: int, num_heads: int, group_size: int = 16, window_size: int = 1024, causal: bool = True,
                 qkv_bias: bool = False, qk_scale: float | None = None, proj_drop: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        self.group_size = positive_int("group_size", group_size)
        self.window_size = positive_int("window_size", window_size, minimum=0)
        check_bool("causal", causal)
        if causal is not True:
            raise ValueError(
                f"causal must be True: CCA-Attention is defined for causal language modelling, got {causal!r}"
            )
        init_attention(self, dim, num_heads, qkv_bias, qk_scale, proj_drop, backend)

    def pattern(self, n) -> Union:
        """The cross pattern this module uses on ``n`` tokens (``n`` queries; ``n // group_size + n`` keys)."""
        n = n[0] if isinstance(n, (tuple, list)) and len(n) == 1 else n
        n = positive_int("n", n)
        return cached_pattern(cca_pattern, n, self.group_size, self.window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, tokens, dim); returns the same shape."""
        check_channels_last(x, self.dim, type(self).__name__, 3, "(batch, tokens, dim)")
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        core_k, core_v = cca_core_tokens(q, k, v, self.group_size, self.scale)
        keys = torch.cat([core_k, k], dim=2)
        values = torch.cat([core_v, v], dim=2)
        out = attend(q, keys, values, self.pattern(n), scale=self.scale, backend=self.backend)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, group_size={self.group_size}, "
                f"window_size={self.window_size}, "
                f"causal=True")
