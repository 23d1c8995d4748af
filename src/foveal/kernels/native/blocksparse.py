"""Block-sparse flash attention on the native extension: ``torch.ops.foveal_native.blocksparse_fwd`` / ``_bwd``.

The C++ kernel (``csrc/blocksparse.cpp``) walks, for every (batch, query heads, query
block), the key blocks of a padded table, with the online softmax fused into the tile
loop; the backward recomputes P from the saved lse (FlashAttention-2), dQ per query
block and dK/dV per key block through the *transposed* table, without atomics. This
module builds the tables it reads:

* ``kv_blocks`` (Bt, Ht, nqb, S) int64, -1 unused: one table for every batch element
  and head (``Bt = Ht = 1``: static patterns; the kernel then stacks a key head's query
  heads as the rows of one tile) or per (batch, query head) (content selections);
* ``mask_index`` (same shape) -1 for a full tile, else a row of ``masks`` (M, block, W):
  the tile's elementwise mask as bits, one uint64 per query row per 64 keys,
  deduplicated (a causal pattern has one diagonal tile shape, a window two);
* the transposed table (CSR over key blocks: the (query instance, slot) pairs reading
  each), built once per table.

Static patterns' tables are cached by pattern value (``foveal.cache.LRU``, as every
plan); a selection's are built per call. Inputs are computed in float32 (float64 for
float64): bfloat16/float16 q, k, v are converted to float32 here and the output back,
the lse stays float32. Key padding, soft-cap and sink logits (a per-head logit joining
every row's softmax as a zero-value key, fused into the kernel's final normaliser) run
in the kernel, and a selection's single key tokens (``kv_tokens``, vertical-slash's
columns: gathered 64 at a time, masked by bits from ``mask_fn`` or, where the rule
reduces to it, causally). A score term read from a table (``RelativePositionBias``, and
the wrappers the lowering puts around it) runs on static patterns: each slot's tile of
``table_index`` is precomputed and deduplicated (cached with the pattern), the kernel
adds ``table[h, index]`` after the cap and returns the table's gradient. Not yet: other
score terms (``ALiBi``, callables) and terms on content selections — ``unsupported``
says so and ``auto`` falls back to the eager kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from foveal.cache import LRU
from foveal.inputs import lse_dtype
from foveal.kernels import native
from foveal.patterns.dynamic import _causal, _ColumnsOffsets
from foveal.patterns.vertical_slash_ranges import _RangesColumns, low_bits, range_tiles

__all__ = ["NativeTables", "NativeBackend", "static_tables", "selection_tables", "tables_for",
           "native_blocksparse_attention", "unsupported", "tile_fill", "BLOCK", "AUTO_MIN_FILL"]

#: the tile of static patterns' tables (keys and queries)
BLOCK = 64
#: mask elements evaluated at once while building the bit masks
_MASK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class NativeTables:
    """Everything the kernel reads besides q, k, v: the block table, the tiles' bit masks, the transposed table."""

    block: int
    kv_blocks: torch.Tensor  # (Bt, Ht, nqb, S) int64
    mask_index: torch.Tensor  # (Bt, Ht, nqb, S) int64, -1 = full tile
    masks: torch.Tensor  # (M, block, W) int64 bits
    t_indptr: torch.Tensor  # (Bt·Htk·nkb + 1,) int64
    t_inst: torch.Tensor  # (E,) int64: flat (bt, ht, qb) instance reading the key block
    t_slot: torch.Tensor  # (E,) int64: its slot
    kv_tokens: torch.Tensor | None = None  # (B, Hq, nqb, T) int64 single key tokens, -1 unused
    token_bits: torch.Tensor | None = None  # (B, Hq, nqb, block, ceil(T / 64)) int64: which rows see which token
    tokens_causal: bool = False  # instead of token_bits: a token is seen by the queries at or after it


def _pack_bits(tiles: torch.Tensor) -> torch.Tensor:
    """(P, rows, cols) bool -> (P, rows, ceil(cols / 64)) int64: bit j % 64 of word j // 64 is column j."""
    p, rows, cols = tiles.shape
    w = -(-cols // 64)
    if w * 64 != cols:
        tiles = torch.nn.functional.pad(tiles, (0, w * 64 - cols))
    weights = (1 << torch.arange(8, dtype=torch.int16)).to(torch.uint8)
    byts = (tiles.reshape(p, rows, w * 8, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)
    return byts.contiguous().view(torch.int64)  # little-endian: byte i holds bits 8i .. 8i+7


def _masks_of(tiles_fn, count: int, block: int):
    """Bits of ``count`` tiles made by ``tiles_fn(start, stop) -> (stop - start, block, block) bool``, deduplicated:
    ``(masks (M, block, W), index (count,))``."""
    w = -(-block // 64)
    if count == 0:
        return torch.zeros(0, block, w, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    step = max(1, _MASK_ELEMENTS // (block * block))
    bits = torch.cat([_pack_bits(tiles_fn(s, min(s + step, count)).cpu()) for s in range(0, count, step)])
    masks, index = torch.unique(bits.reshape(count, -1), dim=0, return_inverse=True)
    return masks.reshape(-1, block, w).contiguous(), index


def _transpose(kv_blocks: torch.Tensor, nkb: int, hkv: int, group: int):
    """CSR over key blocks (bt, key head of the table or 0, kb) of the (instance, slot) pairs that read them."""
    bt, ht, nqb, s = kv_blocks.shape
    flat = kv_blocks.reshape(-1)
    pos = (flat >= 0).nonzero().squeeze(1)
    inst, slot, kb = pos // s, pos % s, flat[pos]
    htk = hkv if ht > 1 else 1
    tk = (inst // nqb) % ht // group if ht > 1 else torch.zeros_like(inst)
    key = ((inst // (ht * nqb)) * htk + tk) * nkb + kb
    order = torch.argsort(key, stable=True)
    indptr = torch.zeros(bt * htk * nkb + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(key, minlength=bt * htk * nkb), 0)
    return indptr, inst[order].contiguous(), slot[order].contiguous()


def _finish(block, kv, partial_index, masks, nkb, hkv, group, tokens=(None, None, False)):
    mask_index = torch.full_like(kv, -1)
    if partial_index is not None:
        mask_index.view(-1)[partial_index[0]] = partial_index[1]
    return NativeTables(block, kv.contiguous(), mask_index.contiguous(), masks, *_transpose(kv, nkb, hkv, group),
                        *tokens)


#: tables of static patterns by (pattern value, block, key heads, group)
TABLES = LRU("native blocksparse tables", maxsize=64)


def static_tables(pattern, hkv: int, group: int, block: int = BLOCK) -> NativeTables:
    """A static pattern's tables (one for every batch element and head), cached by its value."""

    def build():
        from foveal.kernels.blocksparse import layout_tables

        kv, partial = layout_tables(pattern, block)
        kv = kv.to(torch.int64)
        where = (partial & (kv >= 0)).reshape(-1).nonzero().squeeze(1)
        s = kv.shape[1]
        qb, kb = where // max(s, 1), kv.reshape(-1)[where]
        ar = torch.arange(block)

        def tiles(a, b):
            qi = (qb[a:b, None, None] * block + ar[None, :, None]).clamp(max=pattern.n_q - 1)
            kj = (kb[a:b, None, None] * block + ar[None, None, :]).clamp(max=pattern.n_kv - 1)
            return torch.broadcast_to(pattern.mask(qi, kj), (b - a, block, block))

        masks, index = _masks_of(tiles, where.numel(), block)
        nkb = -(-pattern.n_kv // block)
        return _finish(block, kv[None, None], (where, index), masks, nkb, hkv, group)

    return TABLES.get((pattern, block, hkv, group), build, pattern.cacheable)


def selection_tables(sel, hkv: int) -> NativeTables:
    """A ``BlockSelection``'s per-(batch, query head) tables; partial tiles' masks from its ``mask_fn``
    (``VerticalSlashRanges``': from its ranges, ``range_tables``)."""
    if isinstance(sel.mask_fn, _RangesColumns):
        return range_tables(sel, hkv)
    kv = sel.kv_blocks.to(device="cpu", dtype=torch.int64)
    b, hq, nqb, s = kv.shape
    block = sel.block
    used = kv >= 0
    if sel.mask_fn is None:
        part = torch.zeros_like(used)
    elif sel.partial is None:
        part = used
    else:
        part = sel.partial.to("cpu") & used
    where = part.reshape(-1).nonzero().squeeze(1)
    inst = where // max(s, 1)
    bi, hi, qb = inst // (hq * nqb), (inst // nqb) % hq, inst % nqb
    kb = kv.reshape(-1)[where]
    fast = getattr(sel.mask_fn, "block_tiles", None)
    dev = sel.kv_blocks.device
    ar = torch.arange(block, device=dev)

    def tiles(a, c):
        bb, hh, qq, kk = (t[a:c].to(dev) for t in (bi, hi, qb, kb))
        if fast is not None:
            return fast(bb, hh, qq, kk, block)
        qi = (qq[:, None, None] * block + ar[None, :, None]).clamp(max=sel.n - 1)
        kj = (kk[:, None, None] * block + ar[None, None, :]).clamp(max=sel.n - 1)
        return torch.broadcast_to(sel.mask_fn(bb[:, None, None], hh[:, None, None], qi, kj), (c - a, block, block))

    if sel.mask_fn is _causal:
        # the pooled selectors' rule kv <= q: a tile is empty, a triangle or full by the sign of qb − kb alone
        tri = torch.ones(block, block, dtype=torch.bool).tril_()
        masks = _pack_bits(torch.stack([torch.zeros_like(tri), tri, torch.ones_like(tri)]))
        index = (qb - kb).sign() + 1
        full = index == 2
        where, index = where[~full], index[~full]  # below the diagonal: full tiles, no mask
    else:
        masks, index = _masks_of(tiles, where.numel(), block)
    return _finish(block, kv, (where, index), masks, -(-sel.n // block), hkv, hq // hkv, _token_tables(sel))


def range_tables(sel, hkv: int) -> NativeTables:
    """``VerticalSlashRanges``' tables straight from its ranges and gathered columns (``range_tiles``): each partial
    tile's mask is its row-invariant key word, cut causally on the diagonal tile, deduplicated; the columns outside
    kept tiles are single key tokens, seen by the queries at or after them. No tile is evaluated elementwise."""
    info, block = sel.info, sel.block
    kv, words, partial, tokens = range_tiles(*(info[name].to("cpu") for name in
                                               ("range_starts", "range_ends", "column_index")), sel.n, block)
    nqb = kv.shape[2]
    where = partial.reshape(-1).nonzero().squeeze(1)
    diag = (kv == torch.arange(nqb)[:, None]).reshape(-1)[where]
    uniq, index = torch.unique(torch.stack([words.reshape(-1)[where], diag.long()], 1), dim=0, return_inverse=True)
    causal = low_bits(torch.arange(block) + 1)  # row r of the diagonal tile sees keys 0 .. r
    masks = uniq[:, :1] & torch.where(uniq[:, 1:] == 1, causal, torch.full_like(causal, -1))
    toks = (tokens, None, True) if tokens.shape[-1] else (None, None, False)
    hq = kv.shape[1]
    return _finish(block, kv, (where, index.reshape(-1)), masks[..., None].contiguous(), -(-sel.n // block), hkv,
                   hq // hkv, toks)


def _token_tables(sel):
    """A selection's single key tokens: ``(kv_tokens, token_bits, tokens_causal)`` for the kernel."""
    if sel.kv_tokens is None or not sel.kv_tokens.shape[-1]:
        return None, None, False
    tok = sel.kv_tokens.to(device="cpu", dtype=torch.int64).contiguous()
    fn, block = sel.mask_fn, sel.block
    if fn is _causal:
        return tok, None, True
    if isinstance(fn, _ColumnsOffsets):
        b, h, nqb, t = tok.shape
        bi = torch.arange(b)[:, None, None, None]
        hi = torch.arange(h)[None, :, None, None]
        if bool((fn.columns.cpu()[bi, hi, tok.clamp(min=0)] | (tok < 0)).all()):
            # vertical-slash: its tokens are kept columns, whose rule j <= i and (column or diagonal) is j <= i
            return tok, None, True
    b, h, nqb, t = tok.shape
    rows = b * h * nqb
    flat = tok.reshape(rows, t)
    inst = torch.arange(rows)
    ar = torch.arange(block)
    dev = sel.kv_blocks.device
    step = max(1, _MASK_ELEMENTS // (block * t))
    parts = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        tk, ii = flat[r0:r1], inst[r0:r1]
        ok = (tk >= 0)[:, None, :].expand(r1 - r0, block, t)
        if fn is not None:
            qi = (ii % nqb)[:, None, None] * block + ar[None, :, None]
            m = fn((ii // (h * nqb))[:, None, None].to(dev), ((ii // nqb) % h)[:, None, None].to(dev),
                   qi.clamp(max=sel.n - 1).to(dev), tk.clamp(0, sel.n - 1)[:, None, :].to(dev))
            ok = ok & torch.broadcast_to(m.cpu(), ok.shape)
        parts.append(_pack_bits(ok))
    return tok, torch.cat(parts).reshape(b, h, nqb, block, -1).contiguous(), False


#: index tiles of score terms read from a table, by (pattern value, block, the term's geometry)
TERMS = LRU("native blocksparse term index", maxsize=32)


def _table_length(bias) -> int | None:
    """Entries per head of the table a term reads (following wrappers' ``.bias``), or None."""
    b = bias
    while not hasattr(b, "table") and hasattr(b, "bias"):
        b = b.bias
    t = getattr(b, "table", None)
    return t[0].numel() if isinstance(t, torch.Tensor) else None


def term_index(pattern, bias, tabs: NativeTables):
    """``(index (U, block, block) int32, slot (1, 1, nqb, S) int64)``: each slot's tile of ``bias.table_index``,
    deduplicated (a window's tiles repeat), cached by the pattern's value and the term's geometry."""
    from foveal.bias import table_geometry

    def build():
        kv = tabs.kv_blocks[0, 0]
        block = tabs.block
        where = (kv >= 0).reshape(-1).nonzero().squeeze(1)
        qb, kb = where // kv.shape[1], kv.reshape(-1)[where]
        ar = torch.arange(block)
        qi = (qb[:, None, None] * block + ar[None, :, None]).clamp(max=pattern.n_q - 1)
        kj = (kb[:, None, None] * block + ar[None, None, :]).clamp(max=pattern.n_kv - 1)
        idx = torch.broadcast_to(bias.table_index(qi, kj), (where.numel(), block, block)).to(torch.int32)
        uniq, inverse = torch.unique(idx.reshape(where.numel(), -1), dim=0, return_inverse=True)
        slot = torch.zeros(kv.numel(), dtype=torch.int64)
        slot[where] = inverse
        return uniq.reshape(-1, block, block).contiguous(), slot.view(tabs.kv_blocks.shape)

    return TERMS.get((pattern, tabs.block, table_geometry(bias)), build, pattern.cacheable)


class _Native(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, term, tabs, scale, softcap, padding, term_idx):
        t_index, t_slot = term_idx if term_idx is not None else (None, None)
        out, lse = native.ops().blocksparse_fwd(
            q=q, k=k, v=v, kv_blocks=tabs.kv_blocks, mask_index=tabs.mask_index, masks=tabs.masks,
            key_padding=padding, sinks=sinks, kv_tokens=tabs.kv_tokens, token_bits=tabs.token_bits,
            tokens_causal=tabs.tokens_causal, term_table=term, term_index=t_index, term_slot=t_slot,
            block=tabs.block, scale=scale, softcap=softcap,
        )
        ctx.save_for_backward(q, k, v, out, lse, sinks, term)
        ctx.tabs, ctx.scale, ctx.softcap, ctx.padding, ctx.term_idx = tabs, scale, softcap, padding, term_idx
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sinks, term = ctx.saved_tensors
        tabs = ctx.tabs
        t_index, t_slot = ctx.term_idx if ctx.term_idx is not None else (None, None)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        delta = (dout * out).sum(-1)
        if dlse is not None:
            delta = delta - dlse
        dq, dk, dv, dterm = native.ops().blocksparse_bwd(
            q=q, k=k, v=v, dout=dout, lse=lse, delta=delta.contiguous(), kv_blocks=tabs.kv_blocks,
            mask_index=tabs.mask_index, masks=tabs.masks, t_indptr=tabs.t_indptr, t_inst=tabs.t_inst,
            t_slot=tabs.t_slot, key_padding=ctx.padding, kv_tokens=tabs.kv_tokens, token_bits=tabs.token_bits,
            tokens_causal=tabs.tokens_causal, term_table=term, term_index=t_index, term_slot=t_slot,
            block=tabs.block, scale=ctx.scale, softcap=ctx.softcap,
        )
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # the sink's probability exp(sink − lse) times its score gradient (0 − delta): its value is zero
            p = torch.where(lse == float("-inf"), torch.zeros_like(lse), torch.exp(sinks[None, :, None] - lse))
            dsinks = -(p * delta).sum((0, 2))
        return dq, dk, dv, dsinks, (dterm if term is not None else None), None, None, None, None, None


def native_blocksparse_attention(q, k, v, tables: NativeTables, scale: float, *, key_padding_mask=None,
                                 softcap=None, sink_logits=None, bias=None, pattern=None):
    """``(out, lse)`` of q over the key blocks of ``tables`` on the native kernel; differentiable in q, k, v,
    ``sink_logits`` and the table of a ``bias`` read from a table (``RelativePositionBias``; static ``pattern``
    only, whose tables these are). ``out`` has q's dtype, ``lse`` float32 (float64 for float64 inputs)."""
    cdt = lse_dtype(q.dtype)
    qc, kc, vc = (t.to(cdt).contiguous() for t in (q, k, v))
    sinks = None if sink_logits is None else sink_logits.to(cdt).contiguous()
    pad = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
    cap = 0.0 if softcap is None else float(softcap)
    term = term_idx = None
    if bias is not None:
        length = _table_length(bias)
        term = bias.gather(torch.arange(length, device=q.device)).to(cdt)
        if term.shape[0] != q.shape[1]:
            term = term.expand(q.shape[1], -1)
        term = term.contiguous()
        term_idx = term_index(pattern, bias, tables)
    args = (qc, kc, vc, sinks, term, tables, float(scale), cap, pad, term_idx)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sink_logits, term)):
        out, lse = _Native.apply(*args)
    else:
        with torch.no_grad():
            out, lse = _Native.forward(_NoCtx(), *args)
    return out.to(q.dtype), lse


class _NoCtx:
    """A stand-in for autograd's ctx when no gradient is wanted (nothing is kept)."""

    def save_for_backward(self, *tensors):
        pass


def tables_for(pattern, q, k) -> NativeTables:
    """The tables of a static pattern or a ``BlockSelection`` for these q and k."""
    from foveal.patterns.dynamic import BlockSelection

    hkv, group = k.shape[1], q.shape[1] // k.shape[1]
    if isinstance(pattern, BlockSelection):
        return selection_tables(pattern, hkv)
    return static_tables(pattern, hkv, group)


def unsupported(q, pattern, *, bias=None) -> list[str]:
    """Why the native kernel cannot run this (empty: it can)."""
    from foveal.patterns.dynamic import BlockSelection

    reasons = native.common_reasons(q, "native")
    if bias is not None:
        from foveal.bias import table_geometry

        if table_geometry(bias) is None or _table_length(bias) is None:
            reasons.append("native does not take score terms yet, other than a table's (RelativePositionBias)")
        elif isinstance(pattern, BlockSelection):
            reasons.append("native does not take score terms yet on content selections (a table's: static patterns)")
    if not isinstance(pattern, BlockSelection) and not hasattr(pattern, "layout"):
        reasons.append(f"native runs static patterns and BlockSelections, got {type(pattern).__name__}")
    return reasons


#: ``auto`` prefers native for a static pattern only where its allowed pairs fill at least this share of the 64x64
#: tiles the kernel computes (measured with ``git show 729b377:tools/bench_native.py``: a causal window of 512 at
#: 16k fills 89% and native was faster than cpu; a 7x7 neighbourhood on 64x64 fills 11% and cpu took 0.81x/0.85x
#: native's time forward/fwd+bwd on one thread — 0.5 is a choice between those two measured points)
AUTO_MIN_FILL = 0.5
#: tile fill of static patterns, by pattern value
FILLS = LRU("native tile fill", maxsize=256)


def tile_fill(pattern, block: int = BLOCK) -> float:
    """Allowed pairs over the pairs of the tiles the kernel computes (ragged edges cut), for a static pattern."""
    def build():
        from foveal.kernels.blocksparse import layout_tables

        kv, _ = layout_tables(pattern, block)
        rows = torch.clamp(pattern.n_q - torch.arange(kv.shape[0]) * block, max=block)
        cols = torch.where(kv >= 0, torch.clamp(pattern.n_kv - kv * block, max=block), 0)
        computed = int((rows[:, None] * cols).sum())
        return pattern.num_allowed() / computed if computed else 1.0

    return FILLS.get((pattern, block), build, pattern.cacheable)


class NativeBackend:
    """The native C++ block-sparse flash kernel: static patterns through their block layout, content selections
    through their tables; exact, forward and backward, CPU. Unsupported calls say why (``why_not``)."""

    name = "native"
    #: runs lowered calls (static patterns, BlockSelections), as every kernel but the reference
    takes_exact_masks = False

    def why_not(self, call) -> list[str]:
        return unsupported(call.q, call.pattern, bias=call.bias)

    def auto_skip(self, call) -> str | None:
        """Why ``auto`` should pass over native for a call it can run (None: take it): a static pattern that
        fills under ``AUTO_MIN_FILL`` of its tiles, where the gather kernel (cpu) measured faster."""
        from foveal.patterns.dynamic import BlockSelection

        if isinstance(call.pattern, BlockSelection):
            return None
        fill = tile_fill(call.pattern)
        if fill < AUTO_MIN_FILL:
            return f"native computes whole 64x64 tiles: this pattern fills {fill:.0%} of them (< {AUTO_MIN_FILL:.0%})"
        return None

    def run(self, call):
        tabs = tables_for(call.pattern, call.q, call.k)
        return native_blocksparse_attention(call.q, call.k, call.v, tabs, call.scale,
                                            key_padding_mask=call.key_padding_mask, softcap=call.softcap,
                                            bias=call.bias, pattern=call.pattern)
