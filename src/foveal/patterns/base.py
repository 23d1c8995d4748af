"""The Pattern contract and the machinery shared by the built-in patterns.

A pattern says which (query, key) pairs may interact. It knows its token geometry
(``shape``: a 1-D length or an N-D grid, tokens numbered in row-major order) and
defines the mask exactly and elementwise: ``pattern.mask(q_idx, kv_idx)`` returns a
bool tensor, vectorised over broadcastable integer index tensors, with the same
contract as a FlexAttention ``mask_mod`` (``pattern.mask_mod`` has its signature).

Every built-in pattern is a *product of per-axis progressions*: it factorises over
some axes (the flat token index for 1-D rules such as ``Causal``; the grid axes for
N-D rules such as ``Neighborhood``) and, on each axis, the keys a query coordinate
``x`` may see form an arithmetic progression ``first(x) + step(x)·t`` for
``0 <= t < count(x)``. That one definition yields the mask, the range of keys a
block of queries can reach, and exact counts of allowed pairs in any pair of
blocks in closed form, so block layouts cost O(non-empty blocks), never O(N²).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from foveal._checks import positive_int
from foveal.cache import LRU

if TYPE_CHECKING:  # pragma: no cover
    from foveal.layout import BlockLayout

__all__ = ["Pattern", "ProgressionPattern", "row_major_boxes"]

#: block layouts by pattern value and block sizes: equal patterns share them
LAYOUTS = LRU("block layouts", maxsize=128)

# Largest number of elements a temporary of the layout machinery may hold.
_WORK_ELEMENTS = 1 << 22


class Pattern:
    """Base class: which (query, key) pairs may interact, defined elementwise by ``mask``.

    Subclasses set ``shape`` (a tuple: the token grid, ``(n,)`` for a sequence) and
    implement ``mask``. The defaults here derive the layout and the density from
    ``mask`` by evaluating it tile by tile in bounded chunks (O(N²) work, bounded
    memory); the built-in patterns override them with analytic versions.
    """

    shape: tuple[int, ...]
    #: how ``layout`` is derived; shown in reprs of patterns that are not analytic
    layout_method = "chunked mask evaluation"
    #: False for one-off patterns (a decode step's mask): the value-keyed caches do not store them
    cacheable = True

    # -- geometry -------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of query tokens (and of key tokens, unless the pattern is a cross pattern)."""
        return math.prod(self.shape)

    @property
    def kv_shape(self) -> tuple[int, ...]:
        """Geometry of the keys: ``shape`` for self-attention, its own for cross attention."""
        return self.__dict__.get("_kv_shape", self.shape)

    @property
    def n_q(self) -> int:
        return self.n

    @property
    def n_kv(self) -> int:
        return math.prod(self.kv_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    # -- the definition -------------------------------------------------------
    def mask(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Bool tensor: may query ``q_idx`` attend to key ``kv_idx`` (row-major token indices)."""
        raise NotImplementedError

    @property
    def mask_mod(self):
        """``mask`` as a plain function with FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` signature.

        A closure rather than a bound method: FlexAttention tells mask from score
        functions by counting positional arguments, and a bound method counts ``self``.
        The same object is returned every time, so compiled kernels can be reused.
        """
        if "_mask_mod" not in self.__dict__:
            pattern = self

            def mask_mod(b, h, q_idx, kv_idx):
                return pattern.mask(q_idx, kv_idx)

            self.__dict__["_mask_mod"] = mask_mod
        return self.__dict__["_mask_mod"]

    def dense_mask(self, device=None) -> torch.Tensor:
        """The full ``(n_q, n_kv)`` bool mask. O(N²) memory: for tests, pictures and the reference."""
        q = torch.arange(self.n_q, device=device)[:, None]
        k = torch.arange(self.n_kv, device=device)[None, :]
        return self.mask(q, k).expand(self.n_q, self.n_kv)

    # -- derived --------------------------------------------------------------
    def layout(self, block_q: int = 128, block_k: int | None = None) -> "BlockLayout":
        """The block layout for ``block_q`` × ``block_k`` tiles (cached by the pattern's value, bounded)."""
        block_q = positive_int("block_q", block_q)
        block_k = block_q if block_k is None else positive_int("block_k", block_k)
        return LAYOUTS.get((self, block_q, block_k), lambda: self._build_layout(block_q, block_k), self.cacheable)

    def _build_layout(self, block_q: int, block_k: int) -> "BlockLayout":
        from foveal.layout import BlockLayout

        qb, kb = _all_block_pairs(self.n_q, self.n_kv, block_q, block_k)
        counts = tile_counts(self, qb, kb, block_q, block_k)
        return BlockLayout.from_counts(
            self.n_q, self.n_kv, block_q, block_k, qb, kb, counts, method=self.layout_method
        )

    def key_set(self, q_tokens: torch.Tensor) -> torch.Tensor:
        """Sorted key tokens that the queries ``q_tokens`` may reach: a superset of their allowed keys.

        Kernels gather these keys for a group of queries and mask the rest. This
        fallback lists every key of the non-empty 64-key blocks of the queries' blocks.
        """
        block = 64
        lay = self.layout(block, block)
        qb = torch.unique(q_tokens // block)
        kbs = []
        for indptr, indices in ((lay.full_indptr, lay.full_indices), (lay.partial_indptr, lay.partial_indices)):
            starts, stops = indptr[qb], indptr[qb + 1]
            kbs.append(indices[_ranges_to_index(starts, stops)])
        kb = torch.unique(torch.cat(kbs))
        keys = (kb[:, None] * block + torch.arange(block)).flatten()
        return keys[keys < self.n_kv]

    def num_allowed(self) -> int:
        """Number of allowed (query, key) pairs, without an N×N matrix."""
        lay = self.layout(64, 64)
        total = int(lay.full_areas().sum())
        qb, kb = lay.partial_pairs()
        if qb.numel():
            total += int(tile_counts(self, qb, kb, lay.block_q, lay.block_k).sum())
        return total

    def density(self) -> float:
        """Share of the ``n_q · n_kv`` pairs that the pattern allows."""
        return self.num_allowed() / (self.n_q * self.n_kv)

    # -- algebra --------------------------------------------------------------
    #: the classes ``|`` and ``&`` build: ``foveal.patterns.algebra``, which builds on this module, sets them to
    #: its ``Union`` and ``Intersection`` (so that this module imports none of the patterns built on it)
    _union_type: type | None = None
    _intersection_type: type | None = None

    def __or__(self, other: "Pattern") -> "Pattern":
        return Pattern._union_type(self, other)

    def __and__(self, other: "Pattern") -> "Pattern":
        return Pattern._intersection_type(self, other)

    #: every pair (i, j) is allowed (``Full``)
    _allows_every_pair = False
    #: every pair with ``j <= i + n_kv − n_q`` is allowed (``Causal``, ``Full``)
    _allows_every_causal_pair = False

    # -- identity -------------------------------------------------------------
    def _key(self) -> tuple:
        raise NotImplementedError

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable; build a new pattern instead")

    def _set(self, **fields) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    # -- decoding --
    def sees_kept_keys(self) -> bool:
        """Whether, decoding, the query at ``t`` sees key ``t`` and every earlier key some query ``i >= t`` sees.

        Then a KV cache evicted by ``visible_later(·, t)`` needs no mask for the one query
        at ``t``: ``attend_decode`` runs it as ``Full`` on the fused kernel. True for
        ``Causal``, a causal contiguous ``SlidingWindow``, ``Sinks`` joined to one of
        them (StreamingLLM) and their combinations; False (the step's mask is evaluated)
        by default.
        """
        return self._kept_keys_seen() and self._sees_itself()

    def _kept_keys_seen(self) -> bool:
        """For keys ``j <= t``: some query ``i >= t`` sees ``j`` implies query ``t`` sees ``j``."""
        return False

    def _sees_itself(self) -> bool:
        """Every query ``i`` sees key ``i`` (self-attention)."""
        return False

    def visible_later(self, key_pos: torch.Tensor, t: int) -> torch.Tensor:
        """Bool per key: may some query ``i`` with ``t <= i < n_q`` attend to key ``key_pos`` under ``mask``.

        ``key_pos`` is an integer tensor of key positions in ``[0, n_kv)`` (any shape;
        the result has its shape and device). A KV cache decoding with this pattern
        evicts the keys for which it is False: no query from position ``t`` on needs
        them. This default is exact: it evaluates ``mask`` for the queries
        ``t .. n_q − 1`` against the keys in bounded chunks (O((n_q − t)·K) work);
        the built-in patterns override it in closed form.
        """
        key_pos, t = visible_later_args(self, key_pos, t)
        flat = key_pos.reshape(-1)
        seen = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
        if t >= self.n_q or flat.numel() == 0:
            return seen.view(key_pos.shape)
        rows = max(1, _WORK_ELEMENTS // flat.numel())
        for s in range(t, self.n_q, rows):
            q = torch.arange(s, min(s + rows, self.n_q), device=flat.device)
            m = self.mask(q[:, None], flat[None, :])
            seen |= torch.broadcast_to(m, (q.numel(), flat.numel())).any(0)
        return seen.view(key_pos.shape)


def visible_later_args(pattern: Pattern, key_pos, t):
    """Checked arguments of ``pattern.visible_later``: (int64 key positions in ``[0, n_kv)``, int ``t >= 0``)."""
    if not isinstance(key_pos, torch.Tensor) or key_pos.dtype == torch.bool or key_pos.is_floating_point() \
            or key_pos.is_complex():
        got = key_pos.dtype if isinstance(key_pos, torch.Tensor) else type(key_pos).__name__
        raise TypeError(f"key_pos must be an integer tensor of key positions, got {got}")
    t = positive_int("t", t, minimum=0)
    key_pos = key_pos.long()
    if key_pos.numel() and (int(key_pos.min()) < 0 or int(key_pos.max()) >= pattern.n_kv):
        raise ValueError(
            f"key_pos must hold key positions in [0, {pattern.n_kv}) of {pattern!r}, got values in "
            f"[{int(key_pos.min())}, {int(key_pos.max())}]"
        )
    return key_pos, t


class ProgressionPattern(Pattern):
    """A pattern that is a product over ``axes_shape`` of per-axis key progressions.

    Subclasses set ``axes_shape`` (``(n,)`` for flat rules, the grid for N-D rules)
    and implement ``progression(axis, x) -> (first, step, count)``: for query
    coordinate ``x`` on that axis, the allowed key coordinates are
    ``first + step·t`` for ``0 <= t < count`` (``step >= 1``). The mask is the AND
    over axes.
    """

    axes_shape: tuple[int, ...]
    layout_method = "analytic"

    @property
    def kv_axes_shape(self) -> tuple[int, ...]:
        """The axes key coordinates live on (``axes_shape`` unless the keys have their own geometry)."""
        return self.__dict__.get("_kv_axes_shape", self.axes_shape)

    def progression(self, axis: int, x: torch.Tensor):
        raise NotImplementedError

    # -- mask -----------------------------------------------------------------
    def _coords(self, idx: torch.Tensor, shape: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        shape = self.axes_shape if shape is None else shape
        coords = []
        stride = math.prod(shape)
        for length in shape:
            stride //= length
            coords.append((idx // stride) % length)
        return coords

    def mask(self, q_idx, kv_idx):
        q_idx = torch.as_tensor(q_idx)
        kv_idx = torch.as_tensor(kv_idx, device=q_idx.device)
        allowed = None
        for axis, (x, y) in enumerate(zip(self._coords(q_idx), self._coords(kv_idx, self.kv_axes_shape))):
            first, step, count = self.progression(axis, x)
            ok = (y >= first) & (y <= first + step * (count - 1)) & ((y - first) % step == 0)
            allowed = ok if allowed is None else allowed & ok
        return allowed

    # -- layout ---------------------------------------------------------------
    def _build_layout(self, block_q: int, block_k: int):
        from foveal.layout import BlockLayout

        qb, kb = self._candidate_pairs(block_q, block_k)
        counts = self._pair_counts(qb, kb, block_q, block_k)
        return BlockLayout.from_counts(self.n_q, self.n_kv, block_q, block_k, qb, kb, counts, method="analytic")

    def _blocks_as_boxes(self, block: int, keys: bool = False):
        """Boxes (half-open, per axis) covering each row-major block of queries (or of keys)."""
        cache = self.__dict__.setdefault("_box_cache", {})
        if (block, keys) not in cache:
            n, shape = (self.n_kv, self.kv_axes_shape) if keys else (self.n_q, self.axes_shape)
            cache[(block, keys)] = blocks_as_boxes(n, block, shape)
        return cache[(block, keys)]

    def _axis_values(self, axis: int, lo: torch.Tensor, hi: torch.Tensor):
        """Coordinates ``lo..hi-1`` of boxes along one axis, padded: (xs, valid), shape (*lo.shape, width)."""
        width = max(int((hi - lo).max()), 1) if lo.numel() else 1
        xs = lo[..., None] + torch.arange(width)
        valid = xs < hi[..., None]
        xs = torch.minimum(xs, torch.tensor(self.axes_shape[axis] - 1))
        return xs, valid

    def _candidate_pairs(self, block_q: int, block_k: int):
        """Block pairs that may be non-empty: the key blocks within each query block's reach."""
        lo, hi = self._blocks_as_boxes(block_q)  # (nqb, M, nd)
        nd = len(self.axes_shape)
        reach_lo, reach_hi = [], []
        for axis in range(nd):
            xs, valid = self._axis_values(axis, lo[..., axis], hi[..., axis])
            first, step, count = (torch.broadcast_to(t, xs.shape) for t in self.progression(axis, xs))
            ok = valid & (count > 0)
            big = torch.iinfo(torch.int64).max
            kmin = torch.where(ok, first, big).amin(dim=(-1, -2))
            kmax = torch.where(ok, first + step * (count - 1), -1).amax(dim=(-1, -2))
            reach_lo.append(kmin)
            reach_hi.append(kmax)
        reach_lo = torch.stack(reach_lo, -1)  # (nqb, nd)
        reach_hi = torch.stack(reach_hi, -1)
        nonempty = (reach_hi >= reach_lo).all(-1)
        if nd == 1:
            qb = torch.nonzero(nonempty).flatten()
            kb_lo = reach_lo[qb, 0] // block_k
            kb_hi = reach_hi[qb, 0] // block_k
            return _expand_ranges(qb, kb_lo, kb_hi)
        # N-D: walk the rows (all but the last axis) of each reachable bounding box.
        strides = [math.prod(self.kv_axes_shape[a + 1 :]) for a in range(nd)]
        q_list, lo_list, hi_list = [], [], []
        for q in torch.nonzero(nonempty).flatten().tolist():
            rl, rh = reach_lo[q].tolist(), reach_hi[q].tolist()
            base = torch.zeros(1, dtype=torch.int64)
            for a in range(nd - 1):
                base = (base[:, None] + torch.arange(rl[a], rh[a] + 1) * strides[a]).flatten()
            q_list.append(torch.full_like(base, q))
            lo_list.append((base + rl[-1]) // block_k)
            hi_list.append((base + rh[-1]) // block_k)
        if not q_list:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty
        qb, kb = _expand_ranges(torch.cat(q_list), torch.cat(lo_list), torch.cat(hi_list))
        nkb = -(-self.n_kv // block_k)
        key = torch.unique(qb * nkb + kb)
        return key // nkb, key % nkb

    def _box_bounds(self, block: int):
        """Per block, box and axis: bounds of the keys its query rows reach (cached).

        Returns ``(fmax, lmin, lmax, fmin, unit)``, each ``(num_blocks, M, nd)``: the
        largest / smallest first key, the smallest / largest last key over the box's
        rows, and whether every row has step 1 and at least one key.
        """
        cache = self.__dict__.setdefault("_bounds_cache", {})
        if block not in cache:
            lo, hi = self._blocks_as_boxes(block)
            big = torch.iinfo(torch.int64).max
            fields = [[], [], [], [], []]
            for axis in range(len(self.axes_shape)):
                xs, valid = self._axis_values(axis, lo[..., axis], hi[..., axis])
                first, step, count = (torch.broadcast_to(t, xs.shape) for t in self.progression(axis, xs))
                last = first + step * (count - 1)
                fields[0].append(torch.where(valid, first, -1).amax(-1))
                fields[1].append(torch.where(valid, last, big).amin(-1))
                fields[2].append(torch.where(valid & (count > 0), last, -1).amax(-1))
                fields[3].append(torch.where(valid & (count > 0), first, big).amin(-1))
                fields[4].append((~valid | ((step == 1) & (count > 0))).all(-1))
            cache[block] = tuple(torch.stack(f, -1) for f in fields)
        return cache[block]

    def _pair_counts(self, qb, kb, block_q: int, block_k: int) -> torch.Tensor:
        """Exact number of allowed pairs in each block pair.

        Box pairs that the per-box bounds decide (every row covers the key box: full;
        no row reaches it: empty) cost O(1); only the others sum per-row closed-form
        counts.
        """
        qlo_all, qhi_all = self._blocks_as_boxes(block_q)
        klo_all, khi_all = self._blocks_as_boxes(block_k, keys=True)
        fmax, lmin, lmax, fmin, unit = (t[qb][:, :, None, :] for t in self._box_bounds(block_q))
        klo, khi = klo_all[kb][:, None], khi_all[kb][:, None]  # (P, 1, mk, nd)
        qsize = (qhi_all - qlo_all)[qb][:, :, None, :]  # (P, mq, 1, nd)
        ksize = khi - klo
        axis_full = unit & (fmax <= klo) & (lmin >= khi - 1)
        axis_empty = (lmax < klo) | (fmin > khi - 1) | (qsize == 0) | (ksize == 0)
        box_full = axis_full.all(-1) & ~axis_empty.any(-1)
        box_empty = axis_empty.any(-1)
        decided = (box_full | box_empty).all((-1, -2))
        area = (qsize * ksize).prod(-1)  # (P, mq, mk)
        counts = (area * box_full).sum((-1, -2))
        todo = torch.nonzero(~decided).flatten()
        if todo.numel():
            counts[todo] = self._pair_counts_exact(qb[todo], kb[todo], block_q, block_k)
        return counts

    def _pair_counts_exact(self, qb, kb, block_q: int, block_k: int) -> torch.Tensor:
        """Allowed pairs per block pair, summing the closed-form count of every query row."""
        qlo_all, qhi_all = self._blocks_as_boxes(block_q)
        klo_all, khi_all = self._blocks_as_boxes(block_k, keys=True)
        mq, mk = qlo_all.shape[1], klo_all.shape[1]
        chunk = max(1, _WORK_ELEMENTS // (mq * mk * min(block_q, max(self.axes_shape))))
        out = []
        for s in range(0, qb.numel(), chunk):
            q, k = qb[s : s + chunk], kb[s : s + chunk]
            qlo, qhi, klo, khi = qlo_all[q], qhi_all[q], klo_all[k], khi_all[k]
            prod = None
            for axis in range(len(self.axes_shape)):
                xs, valid = self._axis_values(axis, qlo[..., axis], qhi[..., axis])  # (P, mq, W)
                first, step, count = self.progression(axis, xs)
                first, step, count = (t[:, :, None, :] for t in (first, step, count))
                k0 = klo[..., axis][:, None, :, None]  # (P, 1, mk, 1)
                k1 = khi[..., axis][:, None, :, None]
                if bool((step == 1).all()):  # no division needed
                    c = (torch.minimum(first + count - 1, k1 - 1) - torch.maximum(first, k0) + 1).clamp(min=0)
                else:
                    c = progression_count_in(first, step, count, k0, k1)
                c = (c * valid[:, :, None, :]).sum(-1)  # (P, mq, mk)
                prod = c if prod is None else prod * c
            out.append(prod.sum((-1, -2)))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)

    def key_set(self, q_tokens: torch.Tensor) -> torch.Tensor:
        """Sorted key tokens the queries may reach: the product over axes of the per-axis unions."""
        per_axis = []
        for axis, x in enumerate(self._coords(q_tokens)):
            x = torch.unique(x)
            first, step, count = (torch.broadcast_to(t, x.shape) for t in self.progression(axis, x))
            per_axis.append(progression_union(first, step, count))
        flat = per_axis[0]
        for axis in range(1, len(per_axis)):
            flat = (flat[:, None] * self.kv_axes_shape[axis] + per_axis[axis][None, :]).flatten()
        return flat

    def num_allowed(self) -> int:
        total = 1
        for axis, length in enumerate(self.axes_shape):
            x = torch.arange(length)
            _, _, cnt = (torch.broadcast_to(t, x.shape) for t in self.progression(axis, x))
            total *= int(cnt.clamp(min=0).sum())
        return total


def progression_union(first, step, count, budget: int = 1 << 20) -> torch.Tensor:
    """Sorted union of the progressions ``first + step·t`` (``t < count``), or a covering range.

    Unit-step progressions are merged as intervals; others are enumerated while their
    total size is within ``budget``, beyond which the covering range is returned (a
    superset, which is all a key set needs to be).
    """
    keep = count > 0
    first, step, count = first[keep], step[keep], count[keep]
    if first.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    last = first + step * (count - 1)
    if bool((step == 1).all()):
        order = torch.argsort(first)
        f, l = first[order], last[order]
        reach = torch.cummax(l, 0).values
        new = torch.ones_like(f, dtype=torch.bool)
        new[1:] = f[1:] > reach[:-1] + 1
        seg = torch.cumsum(new, 0) - 1
        seg_lo = f[new]
        seg_hi = torch.full_like(seg_lo, -1).scatter_reduce(0, seg, l, "amax")
        return _expand_intervals(seg_lo, seg_hi)
    if int(count.sum()) > budget:
        return torch.arange(int(first.min()), int(last.max()) + 1)
    t = _ranges_to_index(torch.zeros_like(count), count)
    values = torch.repeat_interleave(first, count) + torch.repeat_interleave(step, count) * t
    return torch.unique(values)


def _expand_intervals(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(lo[i], hi[i] + 1)`` over i."""
    lengths = hi - lo + 1
    return torch.repeat_interleave(lo, lengths) + _ranges_to_index(torch.zeros_like(lo), lengths)


def _ranges_to_index(starts: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(starts[i], stops[i])`` over i."""
    lengths = (stops - starts).clamp(min=0)
    total = int(lengths.sum())
    offsets = torch.arange(total) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return torch.repeat_interleave(starts, lengths) + offsets


def progression_count_in(first, step, count, k0, k1):
    """How many of ``first + step·t`` (``0 <= t < count``) lie in ``[k0, k1)``."""
    t_lo = (-((first - k0) // step)).clamp(min=0)  # ceil((k0 - first) / step)
    t_hi = torch.minimum((k1 - 1 - first) // step, count - 1)
    return (t_hi - t_lo + 1).clamp(min=0)


def row_major_boxes(start: int, stop: int, shape: tuple[int, ...]) -> list[tuple[tuple, tuple]]:
    """Split the row-major token range ``[start, stop)`` of a grid into at most 2·ndim−1 boxes."""
    if start >= stop:
        return []
    if len(shape) == 1:
        return [((start,), (stop,))]
    inner = math.prod(shape[1:])
    a0, r0 = divmod(start, inner)
    a1, r1 = divmod(stop, inner)
    if a0 == a1:
        return [((a0, *lo), (a0 + 1, *hi)) for lo, hi in row_major_boxes(r0, r1, shape[1:])]
    boxes = []
    if r0:
        boxes += [((a0, *lo), (a0 + 1, *hi)) for lo, hi in row_major_boxes(r0, inner, shape[1:])]
        a0 += 1
    if a1 > a0:
        boxes.append(((a0,) + (0,) * (len(shape) - 1), (a1, *shape[1:])))
    if r1:
        boxes += [((a1, *lo), (a1 + 1, *hi)) for lo, hi in row_major_boxes(0, r1, shape[1:])]
    return boxes


def blocks_as_boxes(n: int, block: int, shape: tuple[int, ...]):
    """For each row-major block of ``block`` tokens, its boxes as padded (lo, hi) tensors.

    Returns two int64 tensors of shape ``(num_blocks, max_boxes, ndim)``; padding boxes
    are empty (``lo == hi``).
    """
    nb = -(-n // block)
    if len(shape) == 1:
        lo = torch.arange(nb) * block
        hi = torch.clamp(lo + block, max=n)
        return lo[:, None, None], hi[:, None, None]
    boxes = [row_major_boxes(b * block, min((b + 1) * block, n), shape) for b in range(nb)]
    m = max(len(bx) for bx in boxes)
    lo = torch.zeros(nb, m, len(shape), dtype=torch.int64)
    hi = torch.zeros(nb, m, len(shape), dtype=torch.int64)
    for b, bx in enumerate(boxes):
        for i, (l, h) in enumerate(bx):
            lo[b, i] = torch.tensor(l)
            hi[b, i] = torch.tensor(h)
    return lo, hi


def _expand_ranges(qb, kb_lo, kb_hi):
    """Pairs (q, k) for every k in ``[kb_lo, kb_hi]`` of each row."""
    lengths = (kb_hi - kb_lo + 1).clamp(min=0)
    q = torch.repeat_interleave(qb, lengths)
    starts = torch.repeat_interleave(kb_lo, lengths)
    offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return q, starts + offsets


def _all_block_pairs(n_q: int, n_kv: int, block_q: int, block_k: int):
    nqb, nkb = -(-n_q // block_q), -(-n_kv // block_k)
    qb = torch.arange(nqb).repeat_interleave(nkb)
    kb = torch.arange(nkb).repeat(nqb)
    return qb, kb


def tile_counts(pattern: Pattern, qb, kb, block_q: int, block_k: int) -> torch.Tensor:
    """Allowed pairs in each block pair, by evaluating ``pattern.mask`` tile by tile (bounded memory)."""
    chunk = max(1, _WORK_ELEMENTS // (block_q * block_k))
    ar_q, ar_k = torch.arange(block_q), torch.arange(block_k)
    out = []
    for s in range(0, qb.numel(), chunk):
        q = qb[s : s + chunk, None] * block_q + ar_q  # (P, bq)
        k = kb[s : s + chunk, None] * block_k + ar_k  # (P, bk)
        valid = (q < pattern.n_q)[:, :, None] & (k < pattern.n_kv)[:, None, :]
        m = pattern.mask(q.clamp(max=pattern.n_q - 1)[:, :, None], k.clamp(max=pattern.n_kv - 1)[:, None, :])
        out.append((m & valid).sum((-1, -2)))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)
