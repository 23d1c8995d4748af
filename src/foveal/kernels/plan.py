"""The gather plan: a layout in the form the ``cpu`` kernel consumes.

Queries are split into *groups* (tiles of an N-D grid, runs of a sequence); each
group gets the sorted set of key tokens its queries may reach (``pattern.key_set``)
and, unless every (query, key) pair of the group is allowed, a boolean mask over
that set. This is the block layout with query blocks as tiles and each block's key
blocks fused into one gathered key set: a 7×7 neighbourhood of an 8×8 query tile
gathers its 14×14 halo, not the 3×3 key tiles around it.

Groups are sorted by key-set size and cut into *chunks* whose score tiles stay small
(``chunk_elements``), so padding stays within a chunk and the working set is bounded.
Memory: O(n_q · keys per group) for the masks, never O(N²) for local patterns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["GatherPlan", "Chunk", "build_plan", "default_tile"]

#: score elements (query rows × gathered keys) a chunk holds per (batch, head)
CHUNK_ELEMENTS = 1 << 16


@dataclass
class Chunk:
    """Consecutive groups sharing one padded key count.

    ``slots`` is the range of query slots (``groups × group_size``); ``keys`` (groups,
    nk) the gathered key tokens (padding: token 0, masked); ``allowed`` (groups,
    group_size, nk) the mask, or None when every pair is allowed.
    """

    slots: slice
    keys: torch.Tensor
    allowed: torch.Tensor | None
    _bias: dict = field(default_factory=dict, repr=False)

    def keys_on(self, device):
        """The flattened key tokens on ``device`` (cached)."""
        key = str(device)
        if key not in self._bias:
            self._bias[key] = self.keys.flatten().to(device)
        return self._bias[key]

    def bias(self, dtype, device):
        """The mask as an additive term (0 or -inf) in ``dtype`` on ``device`` (cached)."""
        if self.allowed is None:
            return None
        key = (dtype, str(device))
        if key not in self._bias:
            zero = torch.zeros((), dtype=dtype)
            neg = torch.full((), float("-inf"), dtype=dtype)
            self._bias[key] = torch.where(self.allowed, zero, neg).to(device)
        return self._bias[key]


@dataclass
class GatherPlan:
    """Query groups, their key sets and masks, for one pattern and tiling."""

    n_q: int
    n_kv: int
    group_size: int
    #: token of each query slot (padding slots: 0); shape (num_slots,)
    slot_token: torch.Tensor
    #: slot of each query token; shape (n_q,)
    token_slot: torch.Tensor
    chunks: list[Chunk]
    tile: tuple[int, ...]
    _device: dict = field(default_factory=dict, repr=False)

    @property
    def num_slots(self) -> int:
        return int(self.slot_token.numel())

    def gathered_pairs(self) -> int:
        """Query-slot × key pairs the kernel computes (the work, including masked pairs)."""
        return sum(c.keys.shape[0] * self.group_size * c.keys.shape[1] for c in self.chunks)

    def mask_bytes(self) -> int:
        return sum(c.allowed.numel() for c in self.chunks if c.allowed is not None)

    def on(self, device):
        """(slot_token, token_slot) on ``device`` (cached)."""
        key = str(device)
        if key not in self._device:
            self._device[key] = (self.slot_token.to(device), self.token_slot.to(device))
        return self._device[key]


def default_tile(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Query tile per grid: 128-token runs for sequences, 8×8 for 2-D grids, 4×4×4 for 3-D."""
    if len(shape) == 1:
        return (min(128, shape[0]),)
    side = {2: 8, 3: 4}.get(len(shape), 2)
    return tuple(min(side, s) for s in shape)


def _tile_tokens(shape: tuple[int, ...], tile: tuple[int, ...]):
    """Row-major tokens of each tile of the grid, tiles in row-major tile order (ragged at edges)."""
    per_axis = [[torch.arange(s, min(s + t, n)) for s in range(0, n, t)] for n, t in zip(shape, tile)]
    strides = [math.prod(shape[a + 1 :]) for a in range(len(shape))]
    groups = []

    def rec(axis, base):
        if axis == len(shape):
            groups.append(base)
            return
        for r in per_axis[axis]:
            rec(axis + 1, (base[:, None] + r[None, :] * strides[axis]).flatten())

    rec(0, torch.zeros(1, dtype=torch.int64))
    return groups


def build_plan(pattern, tile: tuple[int, ...] | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> GatherPlan:
    """Group the queries of ``pattern`` into tiles and gather each tile's key set and mask."""
    shape = pattern.shape
    tile = default_tile(shape) if tile is None else tuple(tile)
    if len(tile) != len(shape):
        raise ValueError(f"tile must have one entry per grid axis ({len(shape)}), got {tile}")
    groups = _tile_tokens(shape, tile)
    size = math.prod(tile)
    entries = []
    for g, q in enumerate(groups):
        keys = pattern.key_set(q)
        allowed = pattern.mask(q[:, None], keys[None, :])
        entries.append((int(keys.numel()), g, q, keys, allowed))
    entries.sort(key=lambda e: e[0])

    slot_token = torch.zeros(len(groups) * size, dtype=torch.int64)
    token_slot = torch.empty(pattern.n_q, dtype=torch.int64)
    chunks, start = [], 0
    while start < len(entries):
        nk = max(entries[start][0], 1)
        count = max(1, chunk_elements // (size * nk))
        # the chunk's key count is its largest; stop where padding would exceed 1/8
        stop = start + 1
        while stop < len(entries) and stop - start < count and entries[stop][0] * 8 <= nk * 9:
            stop += 1
        part = entries[start:stop]
        nk = max(max(e[0] for e in part), 1)
        keys = torch.zeros(len(part), nk, dtype=torch.int64)
        allowed = torch.zeros(len(part), size, nk, dtype=torch.bool)
        for i, (m, _, q, k, a) in enumerate(part):
            slot0 = (start + i) * size
            slot_token[slot0 : slot0 + q.numel()] = q
            token_slot[q] = torch.arange(slot0, slot0 + q.numel())
            keys[i, :m] = k
            allowed[i, : q.numel(), :m] = a
        full = bool(allowed.all())
        chunks.append(Chunk(slice(start * size, stop * size), keys, None if full else allowed))
        start = stop
    return GatherPlan(pattern.n_q, pattern.n_kv, size, slot_token, token_slot, chunks, tile)
