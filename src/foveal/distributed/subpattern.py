"""The pattern restricted to a pair of token sets: what one rank computes against one shard.

``ShardPattern(pattern, q_tokens, kv_tokens)`` is a cross pattern whose local query
``i`` is global token ``q_tokens[i]`` and local key ``j`` global token
``kv_tokens[j]``; its mask is the parent's mask on the global indices, and its key
sets are the parent's (analytic) key sets mapped to local indices. Token lists are
sorted, so local order is global order restricted, and key sets stay sorted. When the
queries are a band of whole rows of a grid (contiguous order), the shard keeps the
grid's shape so that kernels tile its queries in 2-D or 3-D.
"""

from __future__ import annotations

import torch

from foveal.patterns.base import Pattern

__all__ = ["ShardPattern"]


class ShardPattern(Pattern):
    """``pattern`` seen from the queries ``q_tokens`` against the keys ``kv_tokens`` (sorted global indices)."""

    layout_method = "chunked mask evaluation (shard of a pattern)"

    def __init__(self, pattern: Pattern, q_tokens: torch.Tensor, kv_tokens: torch.Tensor, name: tuple = ()):
        q_tokens = q_tokens.to(torch.int64).cpu()
        self._set(
            parent=pattern,
            q_tokens=q_tokens,
            kv_tokens=kv_tokens.to(torch.int64).cpu(),
            shape=_query_shape(pattern, q_tokens),
            _kv_shape=(int(kv_tokens.numel()),),
            name=tuple(name),
        )

    def mask(self, q_idx, kv_idx):
        q_idx = torch.as_tensor(q_idx)
        dev = q_idx.device
        kv_idx = torch.as_tensor(kv_idx, device=dev)
        return self.parent.mask(self.q_tokens.to(dev)[q_idx], self.kv_tokens.to(dev)[kv_idx])

    def key_set(self, q_tokens: torch.Tensor) -> torch.Tensor:
        keys = self.parent.key_set(self.q_tokens[q_tokens.cpu()])
        pos = torch.searchsorted(self.kv_tokens, keys)
        ok = pos < self.kv_tokens.numel()
        pos, keys = pos[ok], keys[ok]
        return pos[self.kv_tokens[pos] == keys]

    def _key(self):
        return (self.parent, self.name)

    def __repr__(self):
        return (
            f"ShardPattern({self.parent!r}, queries={self.n_q}, keys={self.n_kv}"
            + (f", {self.name}" if self.name else "")
            + ")"
        )


def _query_shape(pattern: Pattern, q_tokens: torch.Tensor) -> tuple[int, ...]:
    """A band of whole rows of an N-D grid keeps the grid's shape (so kernels tile it in 2-D / 3-D); else 1-D."""
    n = int(q_tokens.numel())
    if len(pattern.shape) > 1 and n:
        inner = 1
        for s in pattern.shape[1:]:
            inner *= s
        start = int(q_tokens[0])
        if start % inner == 0 and n % inner == 0 and int(q_tokens[-1]) - start == n - 1:
            return (n // inner, *pattern.shape[1:])
    return (n,)
