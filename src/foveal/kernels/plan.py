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

The build is vectorised over the groups (one pass of tensor operations, not one Python
step per group) for the built-in progression patterns and their unions and
intersections, and evaluates each distinct mask once; other patterns fall back to one
``pattern.key_set`` call per group, with their masks still evaluated for many groups
per ``pattern.mask`` call. 64k tokens of a causal sliding window build in ~0.07 s on one
core (0.7 s before); see ``foveal bench run plan-build``.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field

import torch

from foveal.patterns.algebra import Intersection, Union
from foveal.patterns.base import ProgressionPattern, _expand_intervals, _ranges_to_index

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


def _tile_tokens(shape: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    """Tokens of each tile of the grid, (tiles, prod(tile)), -1 where a ragged edge tile has no token.

    Tiles in row-major tile order; a tile's slots hold its tokens in row-major order, then the -1s.
    """
    nd = len(shape)
    counts = [-(-n // t) for n, t in zip(shape, tile)]
    tokens = torch.zeros([1] * (2 * nd), dtype=torch.int64)
    valid = torch.ones([1] * (2 * nd), dtype=torch.bool)
    for a, (n, t, c) in enumerate(zip(shape, tile, counts)):
        x = torch.arange(c)[:, None] * t + torch.arange(t)
        view = [1] * (2 * nd)
        view[a], view[nd + a] = c, t
        tokens = tokens + (x * math.prod(shape[a + 1 :])).view(view)
        valid = valid & (x < n).view(view)
    tokens = torch.where(valid, tokens, -1).reshape(math.prod(counts), math.prod(tile))
    if not bool(valid.all()):  # a ragged tile's queries first, in row-major order: edge tiles share masks
        tokens = tokens.gather(1, torch.argsort((tokens < 0).to(torch.int8), dim=1, stable=True))
    return tokens


# -- the build ------------------------------------------------------------------------------
#
# The build works on *sets*: the key sets and masks of many query rows at once, as one
# compressed-row (CSR) tensor of sorted keys per row plus a table of distinct masks. Three
# routes produce them, all vectorised over the groups:
#
# * a progression pattern whose axes are the grid's (``Neighborhood``, ``Window``, ``Halo``,
#   ``SlidingWindow``, ``Causal``...): per axis, the key coordinates and the mask of every
#   tile of that axis at once; a group is a product of per-axis tiles, its keys the product
#   of the per-axis key sets, its mask the AND of the per-axis masks;
# * unions and intersections of flat (1-D) progressions (StreamingLLM's window | sinks,
#   ``Causal & SlidingWindow``, ``Dilated``, ``Power``, ``BigBird``): every part's
#   progression for every query of every group at once, merged per group;
# * anything else: key sets from the parts where they are built-in (else one
#   ``pattern.key_set`` call per group), masks from ``pattern.mask`` for many groups per call.
#
# Masks are evaluated once per distinct *descriptor*: a group's key count and, per
# progression and query, the index range of its keys inside the group's key set (or, for
# steps > 1, the progression and the key set relative to the group's first key). Equal
# descriptors give equal masks, so a sliding window over 64k tokens evaluates a handful of
# masks, not a thousand.

_WORK = 1 << 22  # elements a temporary of the build may hold
#: (query, key) pairs per ``mask`` evaluation: small enough that its int64 temporaries stay in cache
#: (2**16 ran 3x faster than 2**22 for a halo on a 64x64 grid on a 2-core CPU)
_MASK_WORK = 1 << 16


@dataclass
class _Sets:
    """Key sets and masks of ``len(offs) - 1`` query rows of ``rows`` slots each.

    Row g gathers ``keys[offs[g]:offs[g+1]]`` (sorted, distinct); its mask is distinct mask
    ``mid[g]``: ``mask_flat[mask_off[u]:mask_off[u+1]]`` viewed as (rows, key count).
    """

    keys: torch.Tensor
    offs: torch.Tensor
    mid: torch.Tensor | None = None
    mask_flat: torch.Tensor | None = None
    mask_off: torch.Tensor | None = None

    @property
    def nk(self) -> torch.Tensor:
        return self.offs[1:] - self.offs[:-1]

    def segment(self, u: int, rows: int) -> torch.Tensor:
        """Distinct mask ``u`` as a (rows, key count) bool tensor (a view)."""
        a, b = int(self.mask_off[u]), int(self.mask_off[u + 1])
        return self.mask_flat[a:b].view(rows, (b - a) // rows)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])


def _row_ids(offs: torch.Tensor) -> torch.Tensor:
    """The row of every element of a CSR tensor."""
    return torch.repeat_interleave(torch.arange(offs.numel() - 1), offs[1:] - offs[:-1])


@dataclass
class _Segs:
    """Per row, the sorted, disjoint, non-adjacent key intervals ``[lo, hi]`` (CSR over rows): a key set
    before it is spelled out, so that unions and intersections cost O(intervals), not O(keys)."""

    lo: torch.Tensor
    hi: torch.Tensor
    offs: torch.Tensor

    def expand(self) -> _Sets:
        counts = torch.zeros(self.offs.numel() - 1, dtype=torch.int64)
        counts.index_add_(0, _row_ids(self.offs), self.hi - self.lo + 1)
        return _Sets(_expand_intervals(self.lo, self.hi), _offsets(counts))


def _from_starts(rows, lo, hi, num_rows) -> _Segs:
    return _Segs(lo, hi, _offsets(torch.bincount(rows, minlength=num_rows)))


def _points(rows: torch.Tensor, vals: torch.Tensor, num_rows: int, n: int) -> _Segs:
    """Segments of the keys ``vals`` of rows ``rows`` (any order, repeats allowed; values in [0, n))."""
    u = torch.unique(rows * (n + 1) + vals)  # a gap between rows: the last key of a row never touches the next
    new = torch.ones_like(u, dtype=torch.bool)
    new[1:] = u[1:] != u[:-1] + 1
    seg = torch.cumsum(new, 0) - 1
    start = u[new]
    end = torch.full_like(start, -1).scatter_reduce(0, seg, u, "amax")
    r = start // (n + 1)
    return _from_starts(r, start - r * (n + 1), end - r * (n + 1), num_rows)


def _interval_segs(first, count, n: int) -> _Segs:
    """Per row of (T, R) intervals ``[first, first + count)``: their union clipped to ``[0, n)``, as segments."""
    lo = first.clamp(min=0)
    hi = (first + count - 1).clamp(max=n - 1)
    live = (count > 0) & (hi >= lo)
    lo_s, order = torch.where(live, lo, n).sort(1)
    hi_s = torch.where(live, hi, -1).gather(1, order)
    live_s = lo_s < n
    reach = hi_s.cummax(1).values
    new = live_s.clone()
    new[:, 1:] &= lo_s[:, 1:] > reach[:, :-1] + 1
    seg = torch.cumsum(new.flatten(), 0) - 1
    seg_lo = lo_s[new]
    seg_hi = torch.full_like(seg_lo, -1).scatter_reduce(0, seg[live_s.flatten()], hi_s[live_s], "amax")
    return _from_starts(torch.nonzero(new)[:, 0], seg_lo, seg_hi, first.shape[0])


def _merge_runs(group, lo, hi):
    """Merge the intervals ``[lo, hi]`` within each group (ids in any order): (group, lo, hi) of the merged ones."""
    big = int(hi.max()) - int(lo.min()) + 2 if lo.numel() else 1
    order = torch.argsort(lo, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    g = group[order]
    shift = g * big - int(lo.min()) if lo.numel() else g
    lo_s, hi_s = lo[order] + shift, hi[order] + shift  # groups never overlap after the shift
    reach = hi_s.cummax(0).values
    new = torch.ones_like(lo_s, dtype=torch.bool)
    new[1:] = lo_s[1:] > reach[:-1] + 1
    seg = torch.cumsum(new, 0) - 1
    seg_hi = torch.full((int(new.sum()),), -1, dtype=torch.int64).scatter_reduce(0, seg, hi_s, "amax")
    return g[new], lo[order][new], seg_hi - shift[new]


def _strided_union(first, step, count, n: int):
    """(row, key) pairs of the union of each row's progressions (T, R), without enumerating overlaps.

    Progressions with equal (step, first mod step) are intervals of one residue class:
    merged there first, so a row lists each key at most once per distinct step.
    """
    live = count > 0
    rows = torch.arange(first.shape[0])[:, None].expand_as(first)[live]
    f, s, c = first[live], step[live], count[live]
    res, t0 = f % s, f // s
    smax = int(s.max()) + 1 if s.numel() else 1
    keys, group = torch.unique((rows * smax + s) * smax + res, return_inverse=True)
    g, t_lo, t_hi = _merge_runs(group, t0, t0 + c - 1)
    g = keys[g]
    res_g, s_g, row_g = g % smax, (g // smax) % smax, g // (smax * smax)
    lengths = t_hi - t_lo + 1
    t = _ranges_to_index(t_lo, t_hi + 1)
    v = torch.repeat_interleave(res_g, lengths) + torch.repeat_interleave(s_g, lengths) * t
    r = torch.repeat_interleave(row_g, lengths)
    ok = (v >= 0) & (v < n)
    return r[ok], v[ok]


def _row_segs(first, step, count, n: int, budget: int = 1 << 20) -> _Segs:
    """Per row of (T, R) progressions ``first + step·t`` (``t < count``): their union in ``[0, n)``, as segments.

    Rows of unit steps merge intervals; others enumerate their keys, or take the covering
    range when a row holds more than ``budget`` (a superset, as ``progression_union``).
    """
    live = count > 0
    unit = ((step == 1) | ~live).all(1)
    if bool(unit.all()):
        return _interval_segs(first, count, n)
    num_rows = first.shape[0]
    rows, los, his = [], [], []
    iu = torch.nonzero(unit).flatten()
    if iu.numel():
        s = _interval_segs(first[iu], count[iu], n)
        rows.append(iu[_row_ids(s.offs)])
        los.append(s.lo)
        his.append(s.hi)
    total = count.sum(1)
    cover = torch.nonzero(~unit & (total > budget)).flatten()
    if cover.numel():
        rows.append(cover)
        los.append(torch.where(live[cover], first[cover], n).amin(1).clamp(min=0))
        last = torch.where(live[cover], first[cover] + step[cover] * (count[cover] - 1), -1)
        his.append(last.amax(1).clamp(max=n - 1))
    enum = torch.nonzero(~unit & (total <= budget)).flatten()
    if enum.numel():
        r, v = _strided_union(first[enum], step[enum], count[enum], n)
        seg = _points(enum[r], v, num_rows, n)
        rows.append(_row_ids(seg.offs))
        los.append(seg.lo)
        his.append(seg.hi)
    rows, lo, hi = torch.cat(rows), torch.cat(los), torch.cat(his)
    order = torch.argsort(rows * (n + 1) + lo)
    return _from_starts(rows[order], lo[order], hi[order], num_rows)


def _combine(parts: list[_Segs], op: str, n: int) -> _Segs:
    """Per row, the union (``|``) or intersection (``&``) of the parts' segments, by a sweep over their ends."""
    if len(parts) == 1:
        return parts[0]
    num_rows = parts[0].offs.numel() - 1
    m = n + 1
    rows = torch.cat([_row_ids(p.offs) for p in parts])
    lo, hi = torch.cat([p.lo for p in parts]), torch.cat([p.hi for p in parts])
    pos, inverse = torch.unique(torch.cat([rows * m + lo, rows * m + hi + 1]), return_inverse=True)
    delta = torch.cat([torch.ones_like(lo), -torch.ones_like(lo)])
    cover = torch.cumsum(torch.zeros_like(pos).index_add_(0, inverse, delta), 0)
    inside = cover >= (1 if op == "|" else len(parts))
    before = torch.cat([torch.zeros(1, dtype=torch.bool), inside[:-1]])
    start, end = pos[inside & ~before], pos[~inside & before] - 1
    r = start // m
    return _from_starts(r, start - r * m, end - r * m, num_rows)


def _plain_progression(p) -> bool:
    """A progression pattern whose mask is its progressions (the base's, or a faster form of it)."""
    return isinstance(p, ProgressionPattern) and (
        type(p).mask is ProgressionPattern.mask or type(p).__dict__.get("mask_is_progression", False)
    )


def _flat_tree(p):
    """``p`` as a tree of flat progressions: ("leaf", p, 0) or ("|" / "&", children); None if it is not one."""
    if _plain_progression(p) and len(p.axes_shape) == 1 and len(p.kv_axes_shape) == 1:
        return ("leaf", p, 0)
    for cls, op in ((Union, "|"), (Intersection, "&")):
        if isinstance(p, cls) and type(p).mask is cls.mask:
            kids = [_flat_tree(c) for c in p.parts]
            return None if any(k is None for k in kids) else (op, kids)
    return None


def _leaves(tree) -> list:
    return [tree] if tree[0] == "leaf" else [leaf for kid in tree[1] for leaf in _leaves(kid)]


def _unique_rows(x: torch.Tensor):
    """(inverse, representative) of the distinct rows of a 2-D tensor: ``x[rep[inverse]] == x`` row by row."""
    _, inverse = torch.unique(x, dim=0, return_inverse=True)
    num = int(inverse.max()) + 1 if inverse.numel() else 0
    rep = torch.full((num,), inverse.numel(), dtype=torch.int64)
    rep.scatter_reduce_(0, inverse, torch.arange(inverse.numel()), "amin")
    return inverse, rep


def _padded(sets: _Sets, idx: torch.Tensor, width: int):
    """Keys of rows ``idx`` as (len(idx), width), padded with key 0, and the (len(idx), width) valid mask."""
    nk = sets.nk[idx]
    valid = torch.arange(width) < nk[:, None]
    out = torch.zeros((idx.numel(), width), dtype=torch.int64)
    out[valid] = sets.keys[_ranges_to_index(sets.offs[idx], sets.offs[idx + 1])]
    return out, valid


def _progressions(tree, rows: torch.Tensor) -> dict:
    """Per leaf of ``tree``: (first, step, count) of every query of ``rows`` (T, R; -1 = none: count 0)."""
    valid = rows >= 0
    x = rows.clamp(min=0)
    prog = {}
    for leaf in _leaves(tree):
        _, p, axis = leaf
        f, s, c = (torch.broadcast_to(torch.as_tensor(t), x.shape) for t in p.progression(axis, x))
        live = valid & (c > 0)
        prog[id(leaf)] = (torch.where(live, f, 0), torch.where(live, s, 1), torch.where(live, c, 0))
    return prog


def _tree_segs(node, prog: dict, n: int) -> _Segs:
    """Key sets of a tree's rows: the union of a leaf's progressions, combined by the tree's | and &."""
    if node[0] == "leaf":
        return _row_segs(*prog[id(node)], n)
    return _combine([_tree_segs(kid, prog, n) for kid in node[1]], node[0], n)


def _tree_sets(tree, rows: torch.Tensor, n: int, masks: bool = True) -> _Sets:
    """Key sets and masks of query rows (T, R) (coordinates, -1 = no query) under a tree of progressions.

    ``n`` is the number of key coordinates. Masks are evaluated once per distinct descriptor.
    """
    leaves = _leaves(tree)
    prog = _progressions(tree, rows)
    sets = _tree_segs(tree, prog, n).expand()
    if not masks:
        return sets
    num_rows, width = rows.shape
    nk = sets.nk
    if sets.keys.numel():
        top = sets.keys.numel() - 1
        first_key = torch.where(nk > 0, sets.keys[sets.offs[:-1].clamp(max=top)], 0)
        last_key = torch.where(nk > 0, sets.keys[(sets.offs[1:] - 1).clamp(min=0, max=top)], -1)
    else:
        first_key, last_key = torch.zeros_like(nk), torch.full_like(nk, -1)
    unit = {id(leaf): bool((prog[id(leaf)][1] == 1).all()) for leaf in leaves}
    desc = [nk[:, None]]
    if not all(unit.values()):  # steps > 1: the key set relative to its first key is part of the descriptor
        rel, ok = _padded(sets, torch.arange(num_rows), max(int(nk.max()), 1))
        desc.append(torch.where(ok, rel - first_key[:, None], -1))
    glob = _row_ids(sets.offs) * n + sets.keys  # globally sorted
    row_base = torch.arange(num_rows)[:, None] * n
    for leaf in leaves:
        f, s, c = prog[id(leaf)]
        if unit[id(leaf)]:  # the index range [j_lo, j_hi) of the leaf's keys in the group's key set
            j_lo = torch.searchsorted(glob, row_base + f.clamp(0, n)) - sets.offs[:-1, None]
            j_hi = torch.searchsorted(glob, row_base + (f + c).clamp(0, n)) - sets.offs[:-1, None]
            desc += [torch.where(c > 0, j_lo, 0), torch.where(c > 0, j_hi, 0)]
        else:  # the terms inside [first key, last key]: first, step, count (relative to the first key)
            t0 = (-((f - first_key[:, None]) // s)).clamp(min=0)
            t1 = torch.minimum((last_key[:, None] - f) // s, c - 1)
            inside = (t1 - t0 + 1).clamp(min=0)
            desc += [torch.where(inside > 0, f + s * t0 - first_key[:, None], 0), torch.where(inside > 0, s, 1), inside]
    inverse, rep = _unique_rows(torch.cat(desc, 1))

    def mask_of(node, kv, sel):
        if node[0] == "leaf":
            f, s, c = (t[sel][:, :, None] for t in prog[id(node)])
            if unit[id(node)]:
                return (kv >= f) & (kv < f + c)
            d = kv - f
            return (d >= 0) & (d < s * c) & (d % s == 0)
        out = [mask_of(kid, kv, sel) for kid in node[1]]
        return functools.reduce(operator.or_ if node[0] == "|" else operator.and_, out)

    flat = []
    rep_nk = nk[rep]
    wide = max(int(rep_nk.max()), 1) if rep.numel() else 1
    step = max(1, _MASK_WORK // (width * wide))
    for a in range(0, rep.numel(), step):
        sel = rep[a : a + step]
        w = max(int(rep_nk[a : a + step].max()), 1)
        kv, ok = _padded(sets, sel, w)
        m = mask_of(tree, kv[:, None, :], sel) & ok[:, None, :]
        flat.append(m[ok[:, None, :].expand(-1, width, -1)])
    sets.mid = inverse
    sets.mask_flat = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.bool)
    sets.mask_off = _offsets(rep_nk * width)
    return _merge_equal(sets, width)


def _axis_rows(length: int, tile: int) -> torch.Tensor:
    """Coordinates of each tile of one axis, (tiles, tile), -1 past the end."""
    x = torch.arange(-(-length // tile))[:, None] * tile + torch.arange(tile)
    return torch.where(x < length, x, -1)


def _product_sets(p, shape, tile, masks: bool = True) -> _Sets:
    """Key sets and masks of the tiles of an N-D progression pattern, as products of per-axis ones."""
    nd = len(shape)
    axes = [_tree_sets(("leaf", p, a), _axis_rows(shape[a], tile[a]), p.kv_axes_shape[a], masks) for a in range(nd)]
    if nd == 1:
        return axes[0]
    kv_strides = [math.prod(p.kv_axes_shape[a + 1 :]) for a in range(nd)]
    vals, offs = axes[0].keys * kv_strides[0], axes[0].offs
    for a in range(1, nd):
        b = axes[a]
        a_len, b_len = offs[1:] - offs[:-1], b.nk
        i = torch.arange(a_len.numel()).repeat_interleave(b_len.numel())
        j = torch.arange(b_len.numel()).repeat(a_len.numel())
        lengths = a_len[i] * b_len[j]
        pair = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        m = _ranges_to_index(torch.zeros_like(lengths), lengths)
        bl = b_len[j][pair]
        vals = vals[offs[i][pair] + m // bl] + b.keys[b.offs[j][pair] + m % bl] * kv_strides[a]
        offs = _offsets(lengths)
    sets = _Sets(vals, offs)
    if not masks:
        return sets
    # a group's mask is the AND-product of its per-axis masks: one id per combination of per-axis ids
    # (and of how many queries each axis tile holds: a ragged tile's rows are compacted like its queries)
    counts = [(int(ax.mask_off.numel()) - 1) * (t + 1) for ax, t in zip(axes, tile)]
    combo = torch.zeros(1, dtype=torch.int64)
    for a, ax in enumerate(axes):
        held = (_axis_rows(shape[a], tile[a]) >= 0).sum(1)
        combo = (combo[:, None] * counts[a] + (ax.mid * (tile[a] + 1) + held)[None, :]).flatten()
    uniq, sets.mid = torch.unique(combo, return_inverse=True)
    flat = []
    for value in uniq.tolist():
        m, valid = None, None
        for a in reversed(range(nd)):
            value, code = divmod(value, counts[a])
            u, held = divmod(code, tile[a] + 1)
            ma, va = axes[a].segment(u, tile[a]), torch.arange(tile[a]) < held
            m = ma if m is None else (ma[:, None, :, None] & m[None, :, None, :]).reshape(
                ma.shape[0] * m.shape[0], ma.shape[1] * m.shape[1])
            valid = va if valid is None else (va[:, None] & valid[None, :]).flatten()
        if not bool(valid.all()):
            m = m[torch.argsort((~valid).to(torch.int8), stable=True)]
        flat.append(m.flatten())
    sets.mask_flat = torch.cat(flat)
    sets.mask_off = _offsets(torch.tensor([t.numel() for t in flat], dtype=torch.int64))
    return _merge_equal(sets, math.prod(tile))


def _grid_route(p, shape) -> bool:
    """True when ``p`` is a progression pattern over the grid's own axes (the product route applies)."""
    return _plain_progression(p) and tuple(p.axes_shape) == tuple(shape) and len(p.kv_axes_shape) == len(shape)


def _key_segs(p, q: torch.Tensor, shape, tile) -> _Segs:
    """Key sets of the groups ``q`` (G, size; -1 = no query) under ``p``, as segments: supersets of allowed keys."""
    if _grid_route(p, shape):
        sets = _product_sets(p, shape, tile, masks=False)
        return _points(_row_ids(sets.offs), sets.keys, q.shape[0], p.n_kv)
    tree = _flat_tree(p)
    if tree is not None:
        return _tree_segs(tree, _progressions(tree, q), p.n_kv)
    for cls, op in ((Union, "|"), (Intersection, "&")):
        if isinstance(p, cls) and type(p).mask is cls.mask:
            return _combine([_key_segs(part, q, shape, tile) for part in p.parts], op, p.n_kv)
    rows, vals = [], []
    for g in range(q.shape[0]):
        tokens = q[g][q[g] >= 0]
        keys = p.key_set(tokens) if tokens.numel() else torch.zeros(0, dtype=torch.int64)
        rows.append(torch.full_like(keys, g))
        vals.append(keys)
    return _points(torch.cat(rows), torch.cat(vals), q.shape[0], p.n_kv)


def _general_sets(p, q: torch.Tensor, shape, tile) -> _Sets:
    """Key sets as ``_key_segs``, masks from ``p.mask`` over many groups per call, deduplicated by their bytes."""
    sets = _key_segs(p, q, shape, tile).expand()
    num, size = q.shape
    nk = sets.nk
    flat = torch.zeros(int(nk.sum()) * size, dtype=torch.bool)
    mask_pos = _offsets(nk * size)
    order = torch.argsort(nk, stable=True)
    nk_sorted = nk[order].clamp(min=1)
    a = 0
    while a < num:
        # a batch of groups (by key count) whose padded masks stay within the work bound
        b = min(num, a + max(1, _MASK_WORK // (size * int(nk_sorted[a]))))
        while b - a > 1 and (b - a) * size * int(nk_sorted[b - 1]) > _MASK_WORK:
            b = a + (b - a) // 2
        sel = order[a:b]
        w = max(int(nk[sel].max()), 1)
        kv, ok = _padded(sets, sel, w)
        qs = q[sel]
        m = torch.broadcast_to(p.mask(qs.clamp(min=0)[:, :, None], kv[:, None, :]), (sel.numel(), size, w))
        m = m & (qs >= 0)[:, :, None]
        flat[_ranges_to_index(mask_pos[sel], mask_pos[sel + 1])] = m[ok[:, None, :].expand(-1, size, -1)]
        a = b
    sets.mid, sets.mask_flat, sets.mask_off = torch.arange(num), flat, mask_pos
    return _merge_equal(sets, size)


def _merge_equal(sets: _Sets, size: int) -> _Sets:
    """Give equal masks one id: the distinct masks compared by content, among those of one key count."""
    lengths = sets.mask_off[1:] - sets.mask_off[:-1]
    if lengths.numel() <= 1:
        return sets
    nk = lengths // size
    new_id = torch.empty(lengths.numel(), dtype=torch.int64)
    keep, next_id = [], 0
    for k in torch.unique(nk).tolist():
        idx = torch.nonzero(nk == k).flatten()
        if k == 0 or idx.numel() == 1:
            inverse, rep = torch.zeros(idx.numel(), dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        else:
            block = sets.mask_flat[_ranges_to_index(sets.mask_off[idx], sets.mask_off[idx + 1])]
            inverse, rep = _unique_rows(block.view(idx.numel(), size * k).to(torch.uint8))
        new_id[idx] = inverse + next_id
        keep.append(idx[rep])
        next_id += rep.numel()
    keep = torch.cat(keep)
    sets.mid = new_id[sets.mid]
    sets.mask_flat = sets.mask_flat[_ranges_to_index(sets.mask_off[keep], sets.mask_off[keep + 1])]
    sets.mask_off = _offsets(lengths[keep])
    return sets


def _sets_for(pattern, q, shape, tile) -> _Sets:
    if _grid_route(pattern, shape):
        return _product_sets(pattern, shape, tile)
    tree = _flat_tree(pattern)
    if tree is not None:
        return _tree_sets(tree, q, pattern.n_kv)
    return _general_sets(pattern, q, shape, tile)


def _pack(sets: _Sets, q: torch.Tensor, chunk_elements: int):
    """Order the groups into pieces (shared-mask runs, then packed leftovers) and the pieces by first group.

    Groups are sorted by (key count, mask); a run of ``max(2, per_chunk // 4)`` or more
    groups with one mask is cut into shared-mask pieces of ``per_chunk`` groups; the short
    runs left over are packed together while the key count grows by at most 1/8.
    Returns the pieces as tensors of group indices.
    """
    num, size = q.shape
    nk = sets.nk
    num_masks = int(sets.mask_off.numel()) - 1
    key = nk * max(num_masks, 1) + sets.mid
    order = torch.argsort(key, stable=True)
    sk = key[order]
    starts = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool), sk[1:] != sk[:-1]])).flatten()
    stops = torch.cat([starts[1:], torch.tensor([num])])
    run_nk = nk[order[starts]]
    per_chunk = (chunk_elements // (size * run_nk.clamp(min=1))).clamp(min=1)
    long_run = (stops - starts) >= torch.clamp(per_chunk // 4, min=2)
    pieces, pending = [], []
    for s0, s1, step, whole in zip(starts.tolist(), stops.tolist(), per_chunk.tolist(), long_run.tolist()):
        if whole:
            pieces += [order[a : min(a + step, s1)] for a in range(s0, s1, step)]
        else:
            pending.append(order[s0:s1])
    if pending:
        pend = torch.cat(pending)
        pnk = nk[pend].tolist()
        a = 0
        while a < len(pnk):
            nk0, b = pnk[a], a + 1
            while b < len(pnk) and b - a < max(1, chunk_elements // (size * max(pnk[b], 1))) \
                    and pnk[b] * 8 <= max(nk0, 1) * 9:
                b += 1
            pieces.append(pend[a:b])
            a = b
    # slots follow the groups' original order where pieces allow: runs of a sequence keep
    # the identity order, which lets the kernel skip permuting queries and outputs
    first = torch.stack([piece.min() for piece in pieces]).tolist()
    return [pieces[i] for i in sorted(range(len(pieces)), key=first.__getitem__)]


def _mask_stats(sets: _Sets, size: int):
    """Per distinct mask: whether every pair is allowed (U,), and whether each row allows a key (U, size)."""
    num = sets.mask_off.numel() - 1
    full = torch.zeros(num, dtype=torch.bool)
    row_any = torch.zeros(num, size, dtype=torch.bool)
    for u in range(num):
        m = sets.segment(u, size)
        if m.shape[1]:
            full[u] = bool(m.all())
            row_any[u] = m.any(1)
    return full, row_any


def build_plan(pattern, tile: tuple[int, ...] | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> GatherPlan:
    """Group the queries of ``pattern`` into tiles and gather each tile's key set and mask.

    Vectorised over the groups (see the routes above); the result is exact (every pair a
    chunk allows is allowed by ``pattern.mask``, and every allowed pair is in its query's
    group) and its masks take O(n_q · keys per group), never O(n_q · n_kv) for local patterns.
    """
    shape = pattern.shape
    tile = default_tile(shape) if tile is None else tuple(tile)
    if len(tile) != len(shape):
        raise ValueError(f"tile must have one entry per grid axis ({len(shape)}), got {tile}")
    q = _tile_tokens(shape, tile)
    num, size = q.shape
    sets = _sets_for(pattern, q, shape, tile)
    full, row_any = _mask_stats(sets, size)
    nk = sets.nk
    pieces = _pack(sets, q, chunk_elements)

    group_order = torch.cat(pieces)
    slot_q = q[group_order].flatten()
    real_slot = slot_q >= 0
    slot_token = torch.where(real_slot, slot_q, 0)
    token_slot = torch.empty(pattern.n_q, dtype=torch.int64)
    token_slot[slot_q[real_slot]] = torch.nonzero(real_slot).flatten()
    chunks, start = [], 0
    for gids in pieces:
        c = gids.numel()
        gnk, mids = nk[gids], sets.mid[gids]
        width = max(int(gnk.max()), 1)
        keys, cols = _padded(sets, gids, width)
        real = q[gids] >= 0
        empty = real & ~row_any[mids]
        if bool(full[mids].all()) and bool((gnk == width).all()):
            mask = None
        elif bool((mids == mids[0]).all()) and int(gnk[0]) == width:
            mask = sets.segment(int(mids[0]), size).clone()[None]
        else:
            mask = torch.zeros(c, size, width, dtype=torch.bool)
            mask[cols[:, None, :].expand(-1, size, -1)] = sets.mask_flat[
                _ranges_to_index(sets.mask_off[mids], sets.mask_off[mids + 1])]
        chunks.append(Chunk(slice(start * size, (start + c) * size), keys, mask, empty if empty.any() else None))
        start += c
    return GatherPlan(pattern.n_q, pattern.n_kv, size, slot_token, token_slot, chunks, tile)
