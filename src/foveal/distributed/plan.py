"""What every rank needs from every other, decided from the pattern's block layout alone.

``cp_layout(pattern, world, order)`` computes, identically on every rank and without
any communication or N×N tensor:

* ``tokens[r]``: the sorted global tokens of rank ``r``;
* ``load[r, s]``: attended block pairs between rank ``r``'s query blocks and rank
  ``s``'s key blocks in ``pattern.layout(block, block)``; ``need = load > 0``;
* ``kv_blocks(r, s)``: the key blocks of rank ``s`` that rank ``r``'s queries reach
  (what the sparse all-gather sends).

``block`` divides every run of the order, so each block has one owner and ``need``
is exact at block level. For orders finer than 16 tokens (``striped`` with a narrow
stripe) a block holds tokens of several ranks and ``need`` is a conservative superset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from foveal.distributed.orders import Order, as_order, order_unit, token_owner
from foveal.distributed.subpattern import ShardPattern

__all__ = ["CPLayout", "cp_layout", "ring_schedule", "ring_hops", "plan_block"]

_CACHE: dict = {}
_CACHE_SIZE = 32


def plan_block(n: int, unit: int, max_blocks: int = 4096) -> int:
    """The block size of the communication plan: a divisor of ``unit``, at least 16 tokens, ≤ ``max_blocks`` blocks.

    Halves ``unit`` while the result stays >= 64 tokens and the sequence keeps at most
    ``max_blocks`` blocks; below 16 tokens per run, falls back to 64-token blocks that
    several ranks share.
    """
    if unit < 16:
        return min(64, n)
    b = unit
    while b % 2 == 0 and b // 2 >= 64 and n // (b // 2) <= max_blocks:
        b //= 2
    return b


@dataclass
class CPLayout:
    pattern: object
    world: int
    order: Order
    block: int
    tokens: list
    owner: torch.Tensor  # rank of each token
    load: torch.Tensor  # (world, world) attended block pairs, queries of r × keys of s
    #: (r·world + s, key block) for every key block of rank s that rank r's queries reach, sorted
    needed_pairs: tuple = field(repr=False)
    _shards: dict = field(default_factory=dict, repr=False)

    @property
    def need(self) -> torch.Tensor:
        return self.load > 0

    @property
    def n(self) -> int:
        return self.pattern.n_q

    def shard_pattern(self, q_name, q_tokens: torch.Tensor, kv_name, kv_tokens: torch.Tensor) -> ShardPattern:
        """The pattern restricted to the queries ``q_tokens`` and keys ``kv_tokens``, cached by their names."""
        key = (q_name, kv_name)
        if key not in self._shards:
            self._shards[key] = ShardPattern(
                self.pattern, q_tokens, kv_tokens, name=(self.world, self.order.name, self.order.block, q_name, kv_name)
            )
        return self._shards[key]

    def kv_blocks(self, r: int, s: int) -> torch.Tensor:
        """Sorted key blocks (of ``block`` tokens) of rank ``s`` that rank ``r``'s queries reach."""
        rs, kbs = self.needed_pairs
        i = r * self.world + s
        lo, hi = torch.searchsorted(rs, torch.tensor([i, i + 1])).tolist()
        return kbs[lo:hi]

    def needed_block_counts(self) -> torch.Tensor:
        """(world, world): how many key blocks of rank s rank r needs."""
        rs, _ = self.needed_pairs
        return torch.bincount(rs, minlength=self.world * self.world).view(self.world, self.world)

    def needed_kv_tokens(self, r: int, s: int) -> torch.Tensor:
        """Positions in rank ``s``'s shard of the key tokens rank ``r`` needs (at block granularity)."""
        blocks = self.kv_blocks(r, s)
        toks = self.tokens[s]
        if blocks.numel() == 0:
            return torch.zeros(0, dtype=torch.int64)
        return torch.nonzero(torch.isin(toks // self.block, blocks)).flatten()


def cp_layout(pattern, world: int, order="contiguous", max_blocks: int = 4096) -> CPLayout:
    """The communication plan of ``pattern`` over ``world`` ranks under ``order`` (cached).

    ``max_blocks`` bounds the number of blocks of the plan's layout (coarser blocks:
    a cheaper plan, a coarser all-gather), as far as the order's runs allow.
    """
    order = as_order(order)
    key = (pattern, world, order, max_blocks)
    if key in _CACHE:
        return _CACHE[key]
    n = pattern.n_q
    unit = order_unit(n, world, order)
    owner = token_owner(pattern, world, order)
    perm = torch.argsort(owner, stable=True)
    tokens = list(perm.view(world, -1).unbind(0))
    block = plan_block(n, unit, max_blocks)
    lay = pattern.layout(block, block)
    qb, kb, _ = lay.states()
    nb = lay.num_q_blocks
    # owners of each block: one per block when the block divides the order's runs
    load = torch.zeros(world * world, dtype=torch.int64)
    if n % block == 0 and unit % block == 0:  # one owner per block
        bown = owner[::block]
        load.index_add_(0, bown[qb] * world + bown[kb], torch.ones_like(qb))
        qown, kown, kblk = bown[qb], bown[kb], kb
    else:  # shared blocks: every owner of the query block needs every owner of the key block
        blk = torch.arange(n) // block
        pairs = torch.unique(blk * world + owner)
        b_of, o_of = pairs // world, pairs % world
        counts = torch.bincount(b_of, minlength=nb)
        ptr = torch.zeros(nb + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(counts, 0)
        qo, ko, kk = [], [], []
        for q, k in zip(qb.tolist(), kb.tolist()):
            for a in o_of[ptr[q] : ptr[q + 1]].tolist():
                for b in o_of[ptr[k] : ptr[k + 1]].tolist():
                    qo.append(a)
                    ko.append(b)
                    kk.append(k)
        qown, kown, kblk = (torch.tensor(x, dtype=torch.int64) for x in (qo, ko, kk))
        load.index_add_(0, qown * world + kown, torch.ones_like(qown))
    load = load.view(world, world)
    # key blocks of s that r needs
    pair = torch.unique((qown * world + kown) * nb + kblk)
    rs, kbs = pair // nb, pair % nb
    out = CPLayout(pattern, world, order, block, tokens, owner, load, (rs, kbs))
    if len(_CACHE) >= _CACHE_SIZE:  # forget the oldest plan
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = out
    return out


@dataclass(frozen=True)
class RingSchedule:
    """Which ring steps compute and which transfers are made, for a need matrix over ``world`` ring positions.

    At step ``t`` position ``r`` holds shard ``(r − t) mod P``; shard ``s`` travels
    ``hops[s]`` hops (the farthest position along the ring that needs it), so the
    transfer of shard ``s`` at step ``t`` is made iff ``t <= hops[s]``.
    """

    world: int
    need: tuple  # need[r][s]
    hops: tuple

    @property
    def steps(self) -> int:
        """Steps run (the local step 0 included)."""
        return max(self.hops) + 1

    def holds(self, r: int, t: int) -> int:
        return (r - t) % self.world

    def computes(self, r: int, t: int) -> bool:
        return bool(self.need[r][self.holds(r, t)])

    def receives(self, r: int, t: int) -> bool:
        """Whether position ``r`` receives at step ``t`` (t >= 1) the shard it then holds."""
        return t >= 1 and t <= self.hops[self.holds(r, t)]

    def sends(self, r: int, t: int) -> bool:
        """Whether position ``r`` sends at step ``t`` (to ``r+1``) the shard it held at step ``t−1``."""
        return t >= 1 and t <= self.hops[self.holds(r, t - 1)]


def ring_hops(need: torch.Tensor) -> torch.Tensor:
    """For each shard ``s``: the farthest ring distance ``t`` at which position ``s + t`` needs it (0: none)."""
    p = need.shape[0]
    s = torch.arange(p)[:, None]
    t = torch.arange(p)[None, :]
    m = need[(s + t) % p, s.expand(p, p)]  # m[s, t]: position s+t needs shard s
    m[:, 0] = False
    return torch.where(m, t.expand(p, p), 0).amax(1)


def ring_schedule(need: torch.Tensor) -> RingSchedule:
    need_t = tuple(tuple(bool(x) for x in row) for row in need.tolist())
    return RingSchedule(need.shape[0], need_t, tuple(ring_hops(need).tolist()))


def group_need(need: torch.Tensor, groups: int) -> torch.Tensor:
    """Need between ``groups`` groups of consecutive ranks (the ring positions of the hybrid method)."""
    p = need.shape[0]
    size = p // groups
    return need.view(groups, size, groups, size).any(3).any(1)
