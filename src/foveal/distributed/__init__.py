"""Context parallelism on ``torch.distributed``: shard long sequences and grids, attend exactly across ranks.

``shard`` / ``unshard`` split (B, H, N, D) tensors along N under a token order
(``contiguous``, ``zigzag``, ``striped``, ``balanced``); ``attend_cp`` computes
``attend`` on the shards by ``ring``, ``allgather``, ``ulysses`` or ``hybrid``,
skipping the communication and compute the pattern's block layout shows are not
needed. ``init`` starts the process group with a timeout.
"""

from foveal.distributed.api import METHODS, attend_cp, shard, unshard
from foveal.distributed.comm import ContextParallelError, CPStats, init
from foveal.distributed.orders import ORDERS, Order, shard_tokens
from foveal.distributed.plan import cp_layout, ring_schedule
from foveal.distributed.subpattern import ShardPattern

__all__ = [
    "init",
    "shard",
    "unshard",
    "attend_cp",
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
