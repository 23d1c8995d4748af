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

#: score elements (query rows × gathered keys) a chunk holds per (batch, head): large
#: enough that batched matmuls run efficiently, small enough to stay near the caches
#: (2**18..2**20 measured best on a 2-core CPU; see ``default_tile``)
CHUNK_ELEMENTS = 1 << 19


@dataclass
class Chunk:
    """Consecutive groups sharing one padded key count.

    ``slots`` is the range of query slots (``groups × group_size``); ``keys`` (groups,
    nk) the gathered key tokens (padding: token 0, masked); ``allowed`` the mask:
    None when every pair is allowed, (1, group_size, nk) when all groups share one
    mask, else (groups, group_size, nk). ``empty_rows`` (groups, group_size) marks
    real queries with no allowed key (None if there are none).
    """

    slots: slice
    keys: torch.Tensor
    allowed: torch.Tensor | None
    empty_rows: torch.Tensor | None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def key_stride(self) -> tuple[int, int] | None:
        """(first key, step) when group i's keys are ``first + i·step + arange(nk)``, else None.

        Such chunks (sliding windows, causal runs) read keys and values through a strided
        view instead of a gather.
        """
        if "stride" not in self._cache:
            c, nk = self.keys.shape
            start = self.keys[:, 0]
            step = int(start[1] - start[0]) if c > 1 else 0
            regular = torch.equal(self.keys, start[:, None] + torch.arange(nk)) and torch.equal(
                start, start[0] + step * torch.arange(c)
            )
            self._cache["stride"] = (int(start[0]), step) if regular and step >= 0 else None
        return self._cache["stride"]

    @property
    def shared(self) -> bool:
        """True when one mask (or none) serves every group of the chunk."""
        return self.allowed is None or self.allowed.shape[0] == 1

    def keys_on(self, device):
        """The flattened key tokens on ``device`` (cached)."""
        key = ("keys", str(device))
        if key not in self._cache:
            self._cache[key] = self.keys.flatten().to(device)
        return self._cache[key]

    def empty_on(self, device):
        key = ("empty", str(device))
        if key not in self._cache:
            self._cache[key] = None if self.empty_rows is None else self.empty_rows.to(device)
        return self._cache[key]

    def bias(self, dtype, device, heads: int = 1):
        """The mask as an additive term (0 or -inf), rows repeated for ``heads`` stacked query heads.

        Shape (1 or groups, group_size · heads, nk), in ``dtype`` on ``device`` (cached).
        """
        if self.allowed is None:
            return None
        key = ("bias", dtype, str(device), heads)
        if key not in self._cache:
            zero = torch.zeros((), dtype=dtype)
            neg = torch.full((), float("-inf"), dtype=dtype)
            b = torch.where(self.allowed, zero, neg)
            if heads > 1:
                b = b[:, :, None, :].expand(-1, -1, heads, -1).reshape(b.shape[0], -1, b.shape[-1])
            self._cache[key] = b.to(device).contiguous()
        return self._cache[key]


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

    @property
    def identity(self) -> bool:
        """True when slot order is the token order (no tiling permutation, no padding)."""
        if "identity" not in self._device:
            self._device["identity"] = self.num_slots == self.n_q and torch.equal(self.slot_token, torch.arange(self.n_q))
        return self._device["identity"]

    def gathered_pairs(self) -> int:
        """Query-slot × key pairs the kernel computes (the work, including masked pairs)."""
        return sum(c.keys.shape[0] * self.group_size * c.keys.shape[1] for c in self.chunks)

    def mask_bytes(self) -> int:
        """Bytes the plan's masks take (shared masks counted once per chunk)."""
        return sum(c.allowed.numel() for c in self.chunks if c.allowed is not None)

    def on(self, device):
        """(slot_token, token_slot) on ``device`` (cached)."""
        key = ("index", str(device))
        if key not in self._device:
            self._device[key] = (self.slot_token.to(device), self.token_slot.to(device))
        return self._device[key]


def default_tile(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Query tile per grid: 64-token runs for sequences, 8×8 for 2-D grids, 4×4×4 for 3-D.

    Measured on a 2-core CPU (``foveal bench speed``, float32, head_dim 64): a causal
    window of 512 over 16k tokens ran 198 ms with 64-token runs, 213 ms with 128 and
    252 ms with 256; a 7×7 neighbourhood on 64×64 ran 12.7 ms with 8×8 tiles, 13.7 ms
    with 4×16, 20 ms with 4×8 and 22 ms with 16×16.
    """
    if len(shape) == 1:
        return (min(64, shape[0]),)
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
    mask_ids: dict[bytes, int] = {}
    for g, q in enumerate(groups):
        keys = pattern.key_set(q)
        allowed = torch.zeros(size, keys.numel(), dtype=torch.bool)
        allowed[: q.numel()] = pattern.mask(q[:, None], keys[None, :])
        mid = mask_ids.setdefault(allowed.numpy().tobytes() + bytes(str(keys.numel()), "ascii"), len(mask_ids))
        entries.append((int(keys.numel()), mid, q, keys, allowed, g))
    entries.sort(key=lambda e: (e[0], e[1]))

    def per_chunk(nk):
        return max(1, chunk_elements // (size * max(nk, 1)))

    # Runs of groups with the same key count and mask become shared-mask chunks; the
    # short runs left over are packed together, padded to the chunk's largest key count.
    pieces, pending, i = [], [], 0
    while i < len(entries):
        j = i
        while j < len(entries) and entries[j][:2] == entries[i][:2]:
            j += 1
        run, step = entries[i:j], per_chunk(entries[i][0])
        if len(run) >= max(2, step // 4):
            pieces += [run[a : a + step] for a in range(0, len(run), step)]
        else:
            pending += run
        i = j
    a = 0
    while a < len(pending):
        nk0, b = pending[a][0], a + 1
        while b < len(pending) and b - a < per_chunk(pending[b][0]) and pending[b][0] * 8 <= max(nk0, 1) * 9:
            b += 1
        pieces.append(pending[a:b])
        a = b

    # slots follow the groups' original order where chunks allow: runs of a sequence keep
    # the identity order, which lets the kernel skip permuting queries and outputs
    pieces.sort(key=lambda piece: min(e[5] for e in piece))
    slot_token = torch.zeros(len(groups) * size, dtype=torch.int64)
    token_slot = torch.empty(pattern.n_q, dtype=torch.int64)
    chunks, start = [], 0
    for part in pieces:
        nk = max(max(e[0] for e in part), 1)
        keys = torch.zeros(len(part), nk, dtype=torch.int64)
        allowed = torch.zeros(len(part), size, nk, dtype=torch.bool)
        real = torch.zeros(len(part), size, dtype=torch.bool)
        for i, (m, _, q, k, a, _) in enumerate(part):
            slot0 = (start + i) * size
            slot_token[slot0 : slot0 + q.numel()] = q
            token_slot[q] = torch.arange(slot0, slot0 + q.numel())
            keys[i, :m] = k
            allowed[i, :, :m] = a
            real[i, : q.numel()] = True
        empty = real & ~allowed.any(-1)
        if bool(allowed[real].all()) and bool(real.all()):
            mask = None
        elif len({e[1] for e in part}) == 1 and all(e[0] == nk for e in part):
            mask = allowed[:1]
        else:
            mask = allowed
        chunks.append(Chunk(slice(start * size, (start + len(part)) * size), keys, mask, empty if empty.any() else None))
        start += len(part)
    return GatherPlan(pattern.n_q, pattern.n_kv, size, slot_token, token_slot, chunks, tile)
