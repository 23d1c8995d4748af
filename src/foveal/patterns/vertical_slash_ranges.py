"""Vertical-slash as MInference's kernel computes it: each kept diagonal becomes a whole key range per query block.

MInference ranks columns and diagonals as ``VerticalSlash`` does, then its CUDA step
``convert_vertical_slash_indexes`` (``csrc/vertical_slash_index.cu``) turns them, for each
query block of ``block`` (64) rows, into contiguous key ranges and gathered columns, and its
kernel attends each range whole (causally) and each gathered column. This module is that
form: ``VerticalSlashRanges`` (the pattern), ``vertical_slash_index`` (the conversion: the
native op ``foveal_native::vertical_slash_index`` when the extension is loaded, else
``vertical_slash_index_torch``, the same walk vectorised over query blocks in torch) and
``range_tiles`` (ranges and columns to the aligned key tiles, their bit words and the
single key tokens the block-sparse kernels read). Jiang et al., "MInference 1.0:
Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", 2024.
"""

from __future__ import annotations

import torch

from foveal.patterns.dynamic import BlockSelection, VerticalSlash

__all__ = ["VerticalSlashRanges", "vertical_slash_index", "vertical_slash_index_torch", "kept_lists",
           "range_tiles", "low_bits"]

#: the widest query/key block: a tile row's keys are one 64-bit word in the native tables
MAX_BLOCK = 64


def kept_lists(columns: torch.Tensor, offsets: torch.Tensor):
    """(B, H, n) bool kept columns and offsets -> ``(vertical (B, H, NV) ascending, slash (B, H, NS) descending)``
    int64, ``-1`` after the last entry of a shorter list (MInference sorts ``v_idx`` up and ``s_idx`` down)."""
    n = columns.shape[-1]
    idx = torch.arange(n, device=columns.device)
    nv = int(columns.sum(-1).max()) if columns.numel() else 0
    ns = int(offsets.sum(-1).max()) if offsets.numel() else 0
    vert = torch.where(columns, idx, n).sort(-1).values[..., :nv]
    slash = torch.where(offsets, idx, -1).sort(-1, descending=True).values[..., :ns]
    return torch.where(vert < n, vert, -1).contiguous(), slash.contiguous()


def _check_lists(vertical, slash, n, block):
    for name, t in (("vertical", vertical), ("slash", slash)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 3:
            raise TypeError(f"{name} must be an int64 (B, H, count) tensor, got {getattr(t, 'dtype', type(t))}")
    if vertical.shape[:2] != slash.shape[:2]:
        raise ValueError(f"vertical and slash must have the same (B, H), got {tuple(vertical.shape[:2])} and "
                         f"{tuple(slash.shape[:2])}")
    for name, v in (("n", n), ("block", block)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def vertical_slash_index(vertical: torch.Tensor, slash: torch.Tensor, n: int, block: int):
    """MInference's ``convert_vertical_slash_indexes`` for query blocks of ``block`` rows of an ``n``-token sequence.

    ``vertical`` (B, H, NV) int64: kept columns ascending; ``slash`` (B, H, NS) int64: kept
    offsets ``i - j`` descending; ``-1`` after the last entry (``kept_lists`` makes both).
    Returns ``(range_starts, range_ends, columns)``: (B, H, nqb, R) key ranges ``[start, end)``
    of each query block, ascending and disjoint, and (B, H, nqb, V) its gathered columns,
    ascending; ``-1`` in unused slots, R and V the largest counts. On the native op
    (``foveal_native::vertical_slash_index``, C++) when the extension is loaded and the
    lists are on the CPU, else ``vertical_slash_index_torch``; both are MInference's walk.
    """
    _check_lists(vertical, slash, n, block)
    op = _native_op()
    if op is not None and vertical.device.type == "cpu":
        rs, re, cols = op(vertical=vertical.contiguous(), slash=slash.contiguous(), n=n, block=block)
    else:
        rs, re, cols = vertical_slash_index_torch(vertical, slash, n, block)
    return _trim(rs), _trim(re), _trim(cols)


def _native_op():
    """``torch.ops.foveal_native.vertical_slash_index`` once ``foveal.kernels.native`` has loaded the extension (at
    the first call that routes; patterns do not import kernels, DESIGN.md), else None: then the torch walk."""
    try:
        return torch.ops.foveal_native.vertical_slash_index
    except (AttributeError, RuntimeError):
        return None


def _trim(t):
    """Drop the trailing slots no (batch, head, query block) uses."""
    width = int((t >= 0).sum(-1).max()) if t.numel() else 0
    return t[..., :width].contiguous()


def _ceil_div(x, d):
    return torch.div(x + d - 1, d, rounding_mode="floor")


def vertical_slash_index_torch(vertical: torch.Tensor, slash: torch.Tensor, n: int, block: int):
    """``vertical_slash_index`` in torch ops (the native extension's fallback), untrimmed: R = max(NS, 1), V = NV.

    Per query block ``[e - block, e)`` its usable offsets ``o < e`` give ``s = max(e − o,
    block)`` in ascending order. MInference's walk opens ``[s − block, s)`` at the first
    ``s``, extends the range's end by a whole block for each ``s`` within a block past it
    and starts a new range at an ``s`` further away; so a range opened at ``s0`` ends at
    ``s0 + block·ceil((s_last − s0) / block)``, and it breaks at the first ``s`` beyond that
    end plus a block. The ranges are found one per pass, vectorised over query blocks.
    A column is gathered when it lies outside every range and before the last range's end.
    """
    _check_lists(vertical, slash, n, block)
    b, h, ns = slash.shape
    dev = slash.device
    nb = -(-n // block)
    end = (torch.arange(nb, device=dev) + 1) * block  # (nb,)
    big = 2 * (n + 2 * block)
    o = slash[:, :, None, :]
    present = o >= 0
    usable = present & (o < end[:, None])
    s = torch.where(usable, torch.clamp(end[:, None] - o, min=block), big)  # (B, H, nb, NS)
    # no usable offset: MInference's sentinel s = e + block; no offset at all: its s_idx = -1, so s = e + 1
    first = torch.where(present.any(-1), end + block, end + 1)
    s = torch.cat([s, torch.where(usable.any(-1), big, first)[..., None]], -1).sort(-1).values
    rows = s.reshape(b * h * nb, ns + 1)
    starts, ends = _runs(rows, (rows < big).sum(-1), block, max(ns, 1))
    starts, ends = starts.view(b, h, nb, -1), ends.view(b, h, nb, -1)
    return starts, ends, _gathered(vertical, starts, ends, big)


def _runs(s, count, block, width):
    """Ranges of MInference's walk over ascending ``s`` (rows, L) (the first ``count`` of each row): (rows, width) x 2."""
    m, length = s.shape
    starts = torch.full((m, width), -1, dtype=torch.int64, device=s.device)
    ends = torch.full_like(starts, -1)
    ptr = torch.zeros(m, dtype=torch.int64, device=s.device)
    pos = torch.arange(length, device=s.device)
    active = torch.arange(m, device=s.device)
    k = 0
    while active.numel():
        r, p, c = s[active], ptr[active], count[active]
        s0 = r.gather(1, p[:, None])
        prev = torch.cat([r[:, :1], r[:, :-1]], 1)
        reach = s0 + block * _ceil_div((prev - s0).clamp(min=0), block) + block  # the running end plus a block
        brk = (pos > p[:, None]) & (pos < c[:, None]) & (r > reach)
        stop = torch.where(brk.any(1), brk.int().argmax(1), c)
        last = r.gather(1, (stop - 1)[:, None])
        starts[active, k] = (s0 - block).squeeze(1)
        ends[active, k] = (s0 + block * _ceil_div(last - s0, block)).squeeze(1)
        ptr[active] = stop
        active = active[stop < c]
        k += 1
    return starts, ends


def _gathered(vertical, starts, ends, big):
    """(B, H, nb, NV): kept columns outside every range and before the last range's end, ascending, -1 padded."""
    b, h, nb, r = starts.shape
    nv = vertical.shape[-1]
    v = vertical[:, :, None, :].expand(b, h, nb, nv).reshape(b * h * nb, nv).contiguous()
    st = torch.where(starts >= 0, starts, big).reshape(-1, r)
    en = torch.where(ends >= 0, ends, big).reshape(-1, r).contiguous()
    at = torch.searchsorted(en, v, right=True)  # the first range ending after the column
    inside = (at < r) & (st.gather(1, at.clamp(max=r - 1)) <= v)
    keep = (v >= 0) & (v < ends.reshape(-1, r).max(-1).values[:, None]) & ~inside
    out = torch.where(keep, v, big).sort(-1).values
    return torch.where(out < big, out, -1).view(b, h, nb, nv)


def low_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 words with the lowest ``x`` bits set (``x`` in [0, 64])."""
    one = torch.ones_like(x)
    return torch.where(x >= 64, -one, (one << x.clamp(max=63)) - 1)


def _pack_rows(row, rows: int):
    """Slots of entries grouped by ``row`` (sorted): ``(slot, width)`` so that ``table[row, slot]`` packs each row."""
    counts = torch.bincount(row, minlength=rows)
    width = int(counts.max()) if rows else 0
    first = torch.cumsum(counts, 0) - counts
    return torch.arange(row.numel(), device=row.device) - first[row], width


def range_tiles(starts, ends, columns, n: int, block: int):
    """The block-sparse form of ranges and gathered columns, causal: ``(kv_blocks, words, partial, kv_tokens)``.

    ``starts``, ``ends`` (B, H, nqb, R) and ``columns`` (B, H, nqb, V) as ``vertical_slash_index``
    gives them. A range, cut to the keys its query block can see (``j < min(e, n)``), covers
    the aligned key tiles ``start // block ... (end − 1) // block``: at most one tile more
    than its length in blocks. ``kv_blocks`` (B, H, nqb, S) those tiles ascending (-1
    unused); ``words`` (same shape, int64) the row-invariant bits of each tile's allowed keys
    (bit ``c``: key ``tile·block + c``; the ranges' cuts and the gathered columns that fall in
    the tile); ``partial`` (bool) tiles that are not whole (a cut, or the diagonal tile,
    causal inside); ``kv_tokens`` (B, H, nqb, T) the gathered columns in no kept tile, -1
    unused. Block-level work: no tile is evaluated elementwise.
    """
    b, h, nb, r = starts.shape
    dev = starts.device
    rows = b * h * nb
    row_end = torch.clamp((torch.arange(nb, device=dev) + 1) * block, max=n)[:, None]  # keys j < row_end are seen
    hi = torch.minimum(ends, row_end)
    ok = (starts >= 0) & (hi > starts)
    rid = ok.reshape(-1).nonzero().squeeze(1)
    lo, hi = starts.reshape(-1)[rid], hi.reshape(-1)[rid]
    kb0 = torch.div(lo, block, rounding_mode="floor")
    cnt = torch.div(hi - 1, block, rounding_mode="floor") - kb0 + 1
    tile_row = (rid // r).repeat_interleave(cnt)
    within = torch.arange(int(cnt.sum()), device=dev) - (torch.cumsum(cnt, 0) - cnt).repeat_interleave(cnt)
    kb = kb0.repeat_interleave(cnt) + within
    base = kb * block
    word = low_bits((hi.repeat_interleave(cnt) - base).clamp(max=block)) & \
        ~low_bits((lo.repeat_interleave(cnt) - base).clamp(min=0))
    key, inv = torch.unique(tile_row * nb + kb, return_inverse=True)  # sorted: row, then tile
    words = torch.zeros(key.numel(), dtype=torch.int64, device=dev).index_add_(0, inv, word)  # disjoint bits: sum = or
    # gathered columns inside a kept tile join its word; the others are single key tokens
    cpos = (columns >= 0).reshape(-1).nonzero().squeeze(1)
    col, crow = columns.reshape(-1)[cpos], cpos // max(columns.shape[-1], 1)
    ckey = crow * nb + torch.div(col, block, rounding_mode="floor")
    at = torch.searchsorted(key, ckey).clamp(max=max(key.numel() - 1, 0))
    hit = (key[at] == ckey) if key.numel() else torch.zeros_like(ckey, dtype=torch.bool)
    words.index_add_(0, at[hit], torch.ones_like(col[hit]) << (col[hit] % block))
    trow, tkb = key // nb, key % nb
    slot, width = _pack_rows(trow, rows)
    kv = torch.full((rows, width), -1, dtype=torch.int64, device=dev)
    wd = torch.zeros((rows, width), dtype=torch.int64, device=dev)
    kv[trow, slot], wd[trow, slot] = tkb, words
    tslot, twidth = _pack_rows(crow[~hit], rows)
    tokens = torch.full((rows, twidth), -1, dtype=torch.int64, device=dev)
    tokens[crow[~hit], tslot] = col[~hit]
    shape = (b, h, nb)
    kv, wd = kv.view(*shape, width), wd.view(*shape, width)
    whole = low_bits(torch.clamp(n - kv.clamp(min=0) * block, max=block))
    partial = (kv >= 0) & ((wd != whole) | (kv == torch.arange(nb, device=dev)[:, None]))
    return kv, wd, partial, tokens.view(*shape, twidth)


class _RangesColumns:
    """``VerticalSlashRanges``' rule, elementwise: ``j <= i`` and (``j`` in a range of ``i``'s query block, or ``j`` a
    kept column before the block's last range end). (B, H, nqb, R) ``starts``/``ends``, (B, H, n) bool ``columns``;
    broadcast index tensors, no tensor larger than theirs (a pass per range slot)."""

    def __init__(self, starts, ends, columns, block: int):
        self.starts, self.ends, self.columns, self.block = starts, ends, columns, block
        self.last_end = ends.max(-1).values if ends.shape[-1] else torch.full(ends.shape[:-1], -1, device=ends.device)

    def __call__(self, b, h, q_idx, kv_idx):
        row = torch.div(q_idx, self.block, rounding_mode="floor")
        ok = self.columns[b, h, kv_idx] & (kv_idx < self.last_end[b, h, row])
        for r in range(self.starts.shape[-1]):
            ok = ok | ((self.starts[b, h, row, r] <= kv_idx) & (kv_idx < self.ends[b, h, row, r]))
        return ok & (kv_idx <= q_idx)


def _pad_last(t, width, value):
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=value) if t.shape[-1] < width else t


class VerticalSlashRanges(VerticalSlash):
    """Vertical-slash as MInference's kernel attends it: each kept diagonal as a whole key range per query block.

    Columns and offsets are ranked and kept exactly as in ``VerticalSlash`` (same
    parameters and defaults). Then, per query block ``[e − block, e)`` (``block`` = 64 =
    MInference's ``BLOCK_M = BLOCK_N``; here it may be smaller, at most 64, and it changes
    the mask), MInference's ``convert_vertical_slash_indexes`` walk: a kept offset ``o < e``
    gives ``s = max(e − o, block)`` and the key range ``[s − block, s)``; ranges are walked
    from the farthest offset in; an ``s`` within one block past the current range's end
    extends that end by a whole block (not to ``s``), a farther one starts a new range.
    Kept columns outside every range and before the last range's end are gathered; the
    others are covered or dropped. Mask: ``j <= i`` and (``j`` in one of the ranges of
    ``i``'s block, or ``j`` a gathered column of that block).

    Differences from ``VerticalSlash`` (``j <= i`` and (``j`` kept or ``i − j`` kept)): a
    kept diagonal brings every key of its range, up to ``2·block − 1`` neighbouring
    diagonals more per row (and a whole block more where ranges are extended), so where
    no column is dropped this mask is a superset of ``VerticalSlash``'s; kept columns at
    or after the last range's end (the diagonal nearest to the query block, when offset 0
    or a near one is kept) are dropped, so a column between the nearest kept diagonal and
    the query is not seen. Two cases follow MInference's code literally: a query block
    with no kept offset ``o < e`` gets the range ``[e, e + block)`` (nothing under the causal
    mask, but every kept column before ``e`` is gathered), and a head with no kept offset
    at all gets ``s = e + 1``. Gathered columns are causal here (``j <= i``); MInference's
    Triton kernel masks only ranges causally, which differs only in that first case.

    Work: the native kernel (``backend="native"``) computes the aligned 64-key tiles that
    cover the ranges (a range of ``L`` keys covers at most ``ceil(L / block) + 1`` tiles;
    partial tiles take a row-invariant bit word, causal on the diagonal tile) plus the
    gathered columns as single key tokens; its tables are built from the ranges, with no
    elementwise evaluation. Selection ``info``: ``columns``, ``offsets`` (B, H, n) bool as
    in ``VerticalSlash``; ``range_starts``, ``range_ends`` (B, H, nqb, R) and
    ``column_index`` (B, H, nqb, V) int64, -1 in unused slots. Jiang et al., "MInference
    1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", 2024.
    """

    def __init__(self, n: int, vertical: int = 1000, slash: int = 6096, *, last_q: int = 64, block: int = 64,
                 always_vertical: int = 30, always_slash: int = 100, min_vertical: int = 30, min_slash: int = 50,
                 causal: bool = True):
        super().__init__(n, vertical, slash, last_q=last_q, block=block, always_vertical=always_vertical,
                         always_slash=always_slash, min_vertical=min_vertical, min_slash=min_slash, causal=causal)
        if self.block > MAX_BLOCK:
            raise ValueError(f"block must be at most {MAX_BLOCK} (MInference's BLOCK_M = BLOCK_N = 64), got {block}")

    def _select(self, q, k, scale):
        cols, offs = self._kept(q, k, scale)
        starts, ends, gathered = vertical_slash_index(*kept_lists(cols, offs), n=self.n, block=self.block)
        kv, _, partial, tokens = range_tiles(starts, ends, gathered, self.n, self.block)
        info = {"columns": cols, "offsets": offs, "range_starts": starts, "range_ends": ends,
                "column_index": gathered}
        return BlockSelection(self.n, self.block, kv, partial, self._mask_fn(info), type(self).__name__, info,
                              kv_tokens=tokens, tokens_in_mask_fn=True)

    def _work(self):
        return super()._work() + 2 * -(-self.n // self.block) * self.n  # the walk's (query block, offset) table

    def _mask_fn(self, info):
        return _RangesColumns(info["range_starts"], info["range_ends"], info["columns"], self.block)

    def _merge(self, parts, b, hq):
        """Slices' range and column tables padded to one width, then merged as every selection."""
        for name in ("range_starts", "range_ends", "column_index"):
            width = max(p.info[name].shape[-1] for _, _, p in parts)
            for _, _, p in parts:
                p.info[name] = _pad_last(p.info[name], width, -1)
        return super()._merge(parts, b, hq)
