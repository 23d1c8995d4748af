"""Context parallelism on ``torch.distributed``: shard long sequences and grids, attend exactly across ranks.

``ContextParallel(pattern, group, order=, method=)`` is the one plan: its ``shard`` /
``unshard`` split (B, H, N, D) tensors along N under its token order (``contiguous``,
``zigzag``, ``striped``, ``balanced``) and its ``attend`` computes ``attend`` on the
shards by ``ring``, ``allgather``, ``ulysses`` or ``hybrid``, skipping the
communication and compute the pattern's block layout shows are not needed. A rank
that fails makes every rank raise ``ContextParallelError`` at once. ``init`` starts
the process group with a timeout.
"""

from foveal.distributed.api import METHODS, ContextParallel
from foveal.distributed.comm import ContextParallelError, CPStats, init
from foveal.distributed.orders import ORDERS, Order, shard_tokens
from foveal.distributed.plan import cp_layout, ring_schedule
from foveal.distributed.subpattern import ShardPattern

__all__ = [
    "init",
    "ContextParallel",
    "METHODS",
    "ORDERS",
    "Order",
    "shard_tokens",
    "cp_layout",
    "ring_schedule",
    "ShardPattern",
    "CPStats",
    "ContextParallelError",
]
