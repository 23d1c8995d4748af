"""Token orders for context parallelism: which global tokens each rank holds.

A sequence (or an N-D grid, flattened in row-major order) of ``n`` tokens is split
among ``world`` ranks. Every rank holds the same number of tokens, as a sorted list of
global token indices, so a rank's local order is the global order restricted to its
tokens. Orders:

* ``contiguous``: rank ``r`` holds ``[r·n/P, (r+1)·n/P)`` (rows of a grid).
* ``zigzag``: the sequence is cut into ``2P`` chunks; rank ``r`` holds chunks ``r``
  and ``2P−1−r`` (balances causal masks; ring-flash-attention's zigzag).
* ``striped``: runs of ``stripe`` tokens dealt round-robin (``stripe=1``: token ``i``
  on rank ``i % P``, as in Striped Attention).
* ``balanced``: blocks of the pattern's layout dealt so that every rank has about the
  same number of attended block pairs (see ``balanced_blocks``).

An order is a name or an ``Order(name, block=None)``; ``block`` is the stripe width
of ``striped`` and the block size of ``balanced``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from foveal._checks import positive_int

__all__ = ["Order", "ORDERS", "as_order", "shard_tokens", "token_owner", "balanced_blocks", "order_unit"]

ORDERS = ("contiguous", "zigzag", "striped", "balanced")


@dataclass(frozen=True)
class Order:
    """A token order: ``name`` in ``ORDERS``; ``block`` the stripe width (striped) or block size (balanced)."""

    name: str = "contiguous"
    block: int | None = None

    def __post_init__(self):
        if self.name not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.name!r}")
        if self.block is not None:
            positive_int("order block", self.block)


def as_order(order) -> Order:
    """An ``Order`` from a name or an ``Order``."""
    if isinstance(order, Order):
        return order
    if isinstance(order, str):
        return Order(order)
    raise TypeError(f"order must be one of {ORDERS} or an Order, got {order!r} ({type(order).__name__})")


def _default_balanced_block(n: int, world: int) -> int:
    """About 8 blocks per rank (fewer when that does not divide, or for very many ranks)."""
    for per_rank in (8, 4, 2):
        if n % (world * per_rank) == 0 and world * per_rank <= 8192:
            return n // (world * per_rank)
    return n // world


def order_unit(n: int, world: int, order) -> int:
    """Tokens per run that one rank holds whole: the finest granularity of the order."""
    order = as_order(order)
    world = positive_int("world", world)
    per_rank, rem = divmod(n, world)
    if rem or per_rank == 0:
        raise ValueError(f"the number of tokens ({n}) must be a positive multiple of the number of ranks ({world})")
    if order.name == "contiguous":
        return per_rank
    if order.name == "zigzag":
        if n % (2 * world):
            raise ValueError(
                f"zigzag order cuts the sequence into 2·ranks = {2 * world} chunks; {n} tokens do not divide"
            )
        return n // (2 * world)
    block = order.block
    if block is None:
        block = 1 if order.name == "striped" else _default_balanced_block(n, world)
    if n % (world * block):
        raise ValueError(
            f"{order.name} order with block {block} needs the number of tokens ({n}) to be a multiple of "
            f"ranks × block = {world * block}"
        )
    return block


def balanced_blocks(pattern, world: int, block: int) -> torch.Tensor:
    """Owner rank of each block of ``block`` tokens, balancing attended block pairs.

    Work of a query block = its number of non-empty key blocks in
    ``pattern.layout(block, block)`` (analytic). Three assignments with the same
    number of blocks per rank are compared: contiguous, zigzag (at block granularity)
    and greedy longest-first (each block, heaviest first, to the least-loaded rank with
    room left); the one with the smallest maximum load wins, ties going to the earlier
    one (more local, so less communication).
    """
    n = pattern.n_q
    nb = n // block
    per = nb // world
    work = pattern.layout(block, block).kv_blocks_per_q_block().to(torch.float64)
    candidates = [torch.arange(nb) // per]
    if per % 2 == 0:
        half = per // 2
        chunk = torch.arange(nb) // half
        candidates.append(torch.where(chunk < world, chunk, 2 * world - 1 - chunk))
    order = sorted(range(nb), key=lambda b: (-float(work[b]), b))
    heap = [(0.0, r) for r in range(world)]  # ranks with room left, by (load, rank)
    room = [per] * world
    owner = [0] * nb
    wl = work.tolist()
    for b in order:
        load, r = heapq.heappop(heap)
        owner[b] = r
        room[r] -= 1
        if room[r]:
            heapq.heappush(heap, (load + wl[b], r))
    candidates.append(torch.tensor(owner, dtype=torch.int64))
    best, best_max = None, None
    for cand in candidates:
        m = float(torch.zeros(world, dtype=torch.float64).index_add_(0, cand, work).max())
        if best is None or m < best_max * (1 - 1e-9):
            best, best_max = cand, m
    return best


def token_owner(pattern_or_n, world: int, order) -> torch.Tensor:
    """Rank holding each global token, an int64 tensor of length ``n`` (O(n), never O(n²))."""
    from foveal.patterns.base import Pattern

    order = as_order(order)
    n = pattern_or_n.n_q if isinstance(pattern_or_n, Pattern) else positive_int("n", pattern_or_n)
    unit = order_unit(n, world, order)
    chunk = torch.arange(n) // unit
    if order.name == "contiguous":
        return chunk
    if order.name == "zigzag":
        return torch.where(chunk < world, chunk, 2 * world - 1 - chunk)
    if order.name == "striped":
        return chunk % world
    if not isinstance(pattern_or_n, Pattern):
        raise TypeError("the balanced order is computed from a pattern's layout: pass the pattern, not a length")
    return balanced_blocks(pattern_or_n, world, unit)[chunk]


def shard_tokens(pattern_or_n, world: int, order) -> list[torch.Tensor]:
    """For each rank, the sorted global token indices it holds (all of the same length)."""
    owner = token_owner(pattern_or_n, world, order)
    perm = torch.argsort(owner, stable=True)
    return list(perm.view(world, -1).unbind(0))
