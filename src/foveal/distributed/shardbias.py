"""A score term seen from a shard: local query / key / head indices mapped to global ones."""

from __future__ import annotations

from foveal.bias import WrappedBias

__all__ = ["ShardBias"]


class ShardBias(WrappedBias):
    """``bias(h + head_offset, q_tokens[q_idx], kv_tokens[kv_idx])``; ``None`` token lists mean identity.

    Gradients reach the same ``parameters()`` as the wrapped term.
    """

    def __init__(self, bias, q_tokens=None, kv_tokens=None, head_offset: int = 0):
        self.bias, self.q_tokens, self.kv_tokens, self.head_offset = bias, q_tokens, kv_tokens, head_offset

    def __call__(self, h, q_idx, kv_idx):
        dev = q_idx.device
        if self.q_tokens is not None:
            q_idx = self.q_tokens.to(dev)[q_idx]
        if self.kv_tokens is not None:
            kv_idx = self.kv_tokens.to(dev)[kv_idx]
        return self.bias(h + self.head_offset, q_idx, kv_idx)


def shard_bias(bias, pattern=None, head_offset: int = 0):
    """``bias`` for a ``ShardPattern`` (its token lists) and a head chunk starting at ``head_offset``.

    Always a ``ShardBias``, even for the first chunk of heads: the wrapped term may
    declare all the query heads (``num_heads``), and the chunk has fewer.
    """
    if bias is None:
        return None
    if pattern is None or not hasattr(pattern, "q_tokens"):
        return ShardBias(bias, head_offset=head_offset)
    return ShardBias(bias, pattern.q_tokens, pattern.kv_tokens, head_offset)
