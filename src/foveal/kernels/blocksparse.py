"""The ``blocksparse`` kernel: exact attention of each (batch, head, query block) over its own key blocks.

Content-selected patterns (``foveal.patterns.dynamic``) pick key blocks per batch
element and query head at call time. This kernel takes that choice as a padded
table ``kv_blocks`` of shape (B, Hq, num_q_blocks, S): the key blocks of each
(b, h, query block), ``-1`` in unused slots (as FlexAttention's ``kv_indices`` /
``kv_num_blocks``, but per batch element and head). Optionally ``partial``
(same shape, bool) marks the slots where the elementwise ``mask_fn(b, h, q_idx,
kv_idx)`` must be applied (a causal diagonal, a column/diagonal structure);
other slots are attended fully. Tokens past the end of a ragged last block are
never attended. Optionally ``kv_tokens`` (B, Hq, num_q_blocks, T) lists single key
tokens gathered besides the blocks (vertical-slash's kept columns outside its
diagonal blocks), ``-1`` unused; ``mask_fn`` applies to them.

Every (b, h, query block) is an *instance*. Instances are processed in chunks
whose score tile (instances × block × kept slots × block) holds at most
``SCORE_ELEMENTS`` elements; each chunk gathers its key/value blocks (padded to the
chunk's largest slot count, padding masked), takes a numerically safe softmax and
writes the output and log-sum-exp. Working set: one chunk's scores plus its
gathered keys and values, ``SCORE_ELEMENTS · (1 + (D + Dv) / block)`` floats at
most (more only when a single instance is larger), plus O(N · D) buffers; never
O(N²). The softmax and its backward are the shared FlashAttention-style core
(``foveal.kernels.core``): the backward recomputes each chunk's scores from the saved
log-sum-exp; key/value gradients are scattered with ``index_add_``. Static patterns
run here too, through their block layout (``layout_tables``).
GQA: query head ``h`` reads key head ``h // (Hq // Hkv)``; keys are never repeated.
A query with no allowed key gets a zero output, ``lse = -inf`` and zero gradients.
Computes in float32 (float64 for float64 inputs); any device PyTorch runs on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from foveal.bias import bias_parameters, float32_term
from foveal.cache import LRU
from foveal.inputs import HALF, check_qkv
from foveal.kernels.core import backward_tile, cap, compute_dtype, delta_rows, softmax_tile

__all__ = ["blocksparse_attention", "check_tables", "layout_tables", "selection_block_mask", "SCORE_ELEMENTS"]

#: score elements one chunk holds (instances × block_q × slots × block_k), as the cpu
#: backend's chunks. BlockTopK(4096, topk=8), 4 heads, head_dim 64, forward, on a shared
#: (loaded) 2-core CPU: 2^18..2^20 took 0.5-1.2 s, too noisy to rank; 2^16 took 3.1 s
#: (per-op overhead dominates); dense causal SDPA took 0.2-0.35 s in the same runs.
SCORE_ELEMENTS = 1 << 19


@dataclass
class _Plan:
    """Per-instance bookkeeping shared by the forward and backward passes.

    Each instance's slots are reordered (attention does not depend on their order):
    *special* slots first (masked tile by tile: partial, or holding a ragged last key
    block), then full ones, then unused (-1) ones.
    """

    n_q: int
    n_kv: int
    block: int
    nkb: int
    table: torch.Tensor  # (R, S) key blocks, special slots first, -1 unused last
    special: torch.Tensor  # (R, S) bool: the slot's tile gets an elementwise mask
    partial: torch.Tensor | None  # (R, S) bool: mask_fn applies (None: every used slot, when mask_fn is given)
    tokens: torch.Tensor | None  # (R, T) single key tokens, -1 unused last
    mask_fn: object
    b_idx: torch.Tensor  # (R,)
    h_idx: torch.Tensor  # (R,)
    qb_idx: torch.Tensor  # (R,)
    kv_head: torch.Tensor  # (R,) the instance's key head in the flattened (B·Hkv) key heads
    chunks: list  # (r0, r1, block slots, token slots, special slots, first slot some row leaves unused)
    bias: object = None  # score term bias(h, q_idx, kv_idx)
    padding: torch.Tensor | None = None  # (B, n_kv) bool, True = ignore
    softcap: float | None = None


def check_tables(q, k, v, kv_blocks, block, partial=None, mask_fn=None, kv_tokens=None):
    """The tables fit q, k and v: shapes, dtypes and index ranges (``ValueError``/``TypeError`` before any work)."""
    check_qkv(q, k, v)
    b, hq, n_q, d = q.shape
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    nqb, nkb = -(-n_q // block), -(-k.shape[2] // block)
    if not isinstance(kv_blocks, torch.Tensor) or kv_blocks.dtype not in (torch.int32, torch.int64):
        got = getattr(kv_blocks, "dtype", type(kv_blocks).__name__)
        raise TypeError(f"kv_blocks must be an int32/int64 tensor, got {got}")
    if kv_blocks.dim() != 4 or tuple(kv_blocks.shape[:3]) != (b, hq, nqb):
        raise ValueError(f"kv_blocks must have shape ({b}, {hq}, {nqb}, slots), got {tuple(kv_blocks.shape)}")
    if kv_blocks.numel() and (int(kv_blocks.min()) < -1 or int(kv_blocks.max()) >= nkb):
        raise ValueError(f"kv_blocks entries must be -1 (unused) or key blocks in [0, {nkb}), got range "
                         f"[{int(kv_blocks.min())}, {int(kv_blocks.max())}]")
    if partial is not None and (partial.dtype != torch.bool or partial.shape != kv_blocks.shape):
        raise ValueError(
            f"partial must be a bool tensor of shape {tuple(kv_blocks.shape)}, "
            f"got {partial.dtype} {tuple(partial.shape)}"
        )
    if kv_tokens is not None:
        if not isinstance(kv_tokens, torch.Tensor) or kv_tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"kv_tokens must be None or an int32/int64 tensor, got {type(kv_tokens).__name__}")
        if kv_tokens.dim() != 4 or tuple(kv_tokens.shape[:3]) != (b, hq, nqb):
            raise ValueError(f"kv_tokens must have shape ({b}, {hq}, {nqb}, tokens), got {tuple(kv_tokens.shape)}")
        if kv_tokens.numel() and (int(kv_tokens.min()) < -1 or int(kv_tokens.max()) >= k.shape[2]):
            raise ValueError(f"kv_tokens entries must be -1 (unused) or key tokens in [0, {k.shape[2]}), got range "
                             f"[{int(kv_tokens.min())}, {int(kv_tokens.max())}]")
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable (b, h, q_idx, kv_idx) -> bool tensor, got {type(mask_fn).__name__}")


def _sorted_slots(key, *tables):
    """``tables`` with each row's slots reordered by ascending ``key`` (stable)."""
    order = torch.argsort(key.to(torch.int8), dim=1, stable=True)
    return [None if t is None else t.gather(1, order) for t in tables]


def _chunks(counts, tcounts, scounts, block):
    """Consecutive instances cut greedily so that a chunk's score tile, rows × block × (widest row), stays within
    ``SCORE_ELEMENTS`` (a lone larger instance is a chunk of its own); per chunk its widths and first unused slot."""
    budget = max(1, SCORE_ELEMENTS // block)
    chunks, r0 = [], 0
    cs, ts, ss = counts.tolist(), tcounts.tolist(), scounts.tolist()
    r = 0
    while r0 < len(cs):
        c_max, t_max, s_max, c_min = cs[r0], ts[r0], ss[r0], cs[r0]
        r = r0 + 1
        while r < len(cs):
            c2, t2 = max(c_max, cs[r]), max(t_max, ts[r])
            if (r + 1 - r0) * (c2 * block + t2) > budget:
                break
            c_max, t_max, s_max, c_min = c2, t2, max(s_max, ss[r]), min(c_min, cs[r])
            r += 1
        chunks.append((r0, r, c_max, t_max, s_max, c_min))
        r0 = r
    return chunks


def _plan(q, k, kv_blocks, block, partial, mask_fn, kv_tokens=None, bias=None, padding=None, softcap=None) -> _Plan:
    b, hq, n_q, _ = q.shape
    hkv, n_kv = k.shape[1], k.shape[2]
    nqb, nkb = -(-n_q // block), -(-n_kv // block)
    dev = q.device
    table = kv_blocks.to(device=dev, dtype=torch.int64).reshape(b * hq * nqb, kv_blocks.shape[-1])
    used = table >= 0
    if mask_fn is None:
        partial = None
        special = torch.zeros_like(used)
    elif partial is None:
        special = used.clone()
    else:
        partial = partial.to(dev).reshape(table.shape) & used
        special = partial.clone()
    if n_kv % block:
        special |= table == nkb - 1  # tokens past n_kv are cut tile by tile
    table, special, partial = _sorted_slots(torch.where(used, (~special).to(torch.int8), 2), table, special, partial)
    counts, scounts = used.sum(1), special.sum(1)
    tokens, tcounts = None, torch.zeros_like(counts)
    if kv_tokens is not None and kv_tokens.shape[-1]:
        flat = kv_tokens.to(device=dev, dtype=torch.int64).reshape(table.shape[0], kv_tokens.shape[-1])
        (tokens,) = _sorted_slots(flat < 0, flat)
        tcounts = (tokens >= 0).sum(1)
    inst = torch.arange(table.shape[0], device=dev)
    b_idx, h_idx, qb_idx = inst // (hq * nqb), (inst // nqb) % hq, inst % nqb
    kv_head = b_idx * hkv + h_idx // (hq // hkv)
    return _Plan(n_q, n_kv, block, nkb, table, special, partial, tokens, mask_fn, b_idx, h_idx, qb_idx, kv_head,
                 _chunks(counts, tcounts, scounts, block), bias, padding, softcap)


def _pad_rows(x, n_blocks, block):
    """(B, H, N, E) -> (B·H·n_blocks, block, E), zero rows past N."""
    b, h, n, e = x.shape
    if n_blocks * block != n:
        x = F.pad(x, (0, 0, 0, n_blocks * block - n))
    return x.reshape(b * h * n_blocks, block, e)


def _tiles(plan: _Plan, rows, blocks):
    """``mask_fn`` on whole (query block, key block) tiles: (P, block, block) bool for instances ``rows``.

    A ``mask_fn`` that offers ``block_tiles(b, h, q_block, kv_block, block)`` (the same rule, tile by
    tile) is asked for them; otherwise it is evaluated elementwise. Indices past the ends are clamped
    (those entries are cut separately).
    """
    bs = plan.block
    b, h, qb = plan.b_idx[rows], plan.h_idx[rows], plan.qb_idx[rows]
    fast = getattr(plan.mask_fn, "block_tiles", None)
    if fast is not None:
        return fast(b, h, qb, blocks, bs)
    ar = torch.arange(bs, device=rows.device)
    qi = (qb[:, None, None] * bs + ar[None, :, None]).clamp(max=plan.n_q - 1)
    kj = (blocks[:, None, None] * bs + ar[None, None, :]).clamp(max=plan.n_kv - 1)
    return torch.broadcast_to(plan.mask_fn(b[:, None, None], h[:, None, None], qi, kj), (rows.numel(), bs, bs))


def _special_forbidden(plan: _Plan, r0, r1, p_count, u_from):
    """Forbidden pairs of the first ``p_count`` slots of instances r0:r1, laid out as their scores:
    (r, block, p_count, block) bool."""
    bs, r = plan.block, r1 - r0
    tb = plan.table[r0:r1, :p_count]
    ar = torch.arange(bs, device=tb.device)
    ok = None  # unused slots and tokens past n_kv, (r, p, 1, block)
    if u_from < p_count or (plan.n_kv % bs and bool((tb == plan.nkb - 1).any())):
        ok = ((tb >= 0)[..., None] & (tb[..., None] * bs + ar < plan.n_kv))[:, :, None, :]
    if plan.mask_fn is None:
        m = ok.expand(-1, -1, bs, -1)
    else:
        part = plan.special[r0:r1, :p_count] & (tb >= 0) if plan.partial is None else plan.partial[r0:r1, :p_count]
        if bool(part.all()):
            rows = torch.arange(r0, r1, device=tb.device).repeat_interleave(p_count)
            m = _tiles(plan, rows, tb.reshape(-1)).reshape(r, p_count, bs, bs)
        else:
            m = torch.ones(r, p_count, bs, bs, dtype=torch.bool, device=tb.device)
            ri, si = part.nonzero(as_tuple=True)
            if ri.numel():
                m[ri, si] = _tiles(plan, ri + r0, tb[ri, si])
        if ok is not None:
            m = m & ok
    out = torch.empty(r, bs, p_count, bs, dtype=torch.bool, device=tb.device)
    return torch.bitwise_not(m.transpose(1, 2), out=out)


def _token_ids(plan: _Plan, r0, r1, s_count, t_count):
    """Key token of every gathered column of instances r0:r1, (r, S·block + T), clamped into [0, n_kv)."""
    bs = plan.block
    tb = plan.table[r0:r1, :s_count].clamp(min=0)
    tok = (tb[:, :, None] * bs + torch.arange(bs, device=tb.device)).reshape(r1 - r0, -1)
    if t_count:
        tok = torch.cat([tok, plan.tokens[r0:r1, :t_count]], 1)
    return tok.clamp(0, plan.n_kv - 1)


def _term(plan: _Plan, r0, r1, tok, cdt, bias=None):
    """The score term (``plan.bias`` unless ``bias`` is given) of instances r0:r1 at their gathered keys:
    (r, block, keys)."""
    qi = (plan.qb_idx[r0:r1, None, None] * plan.block + torch.arange(plan.block, device=tok.device)[None, :, None])
    vals = (plan.bias if bias is None else bias)(plan.h_idx[r0:r1, None, None], qi.clamp(max=plan.n_q - 1), tok[:, None, :])
    return torch.broadcast_to(vals, (r1 - r0, plan.block, tok.shape[1])).to(cdt)


def _run(ids, r):
    """The first block when a one-instance chunk's blocks are consecutive (then they are a view), else None."""
    if r != 1 or ids.numel() < 2:
        return None
    first = int(ids[0])
    return first if int(ids[-1]) - first == ids.numel() - 1 and bool((ids.diff() == 1).all()) else None


def _gather(plan: _Plan, blocks, flat, ids, trows, r, run=None):
    """Keys (or values) of a chunk: whole blocks ``ids`` (r·S,) then single rows ``trows`` (r·T,): (r, S·block + T, E);
    a view when ``run`` (the first of consecutive blocks) is given and there are no single rows."""
    if run is not None:
        g = blocks[run:run + ids.numel()].reshape(1, -1, blocks.shape[-1])
    else:
        g = blocks.index_select(0, ids).view(r, -1, blocks.shape[-1])
    if trows is None:
        return g
    return torch.cat([g, flat.index_select(0, trows).view(r, -1, flat.shape[-1])], 1)


def _chunk_scores(plan: _Plan, qc, kb, kf, chunk, need_grad=False):
    """Final scores of one chunk (``qc`` already scaled), (r, block, S·block + T): capped, score term added,
    masked; and the block ids, token rows, gathered keys, token indices (or None) and the cap's derivative."""
    r0, r1, s_count, t_count, p_count, u_from = chunk
    bs, r = plan.block, r1 - r0
    tb = plan.table[r0:r1, :s_count]
    ids = (plan.kv_head[r0:r1, None] * plan.nkb + tb.clamp(min=0)).reshape(-1)
    trows = None
    if t_count:
        tk = plan.tokens[r0:r1, :t_count]
        trows = (plan.kv_head[r0:r1, None] * (plan.nkb * bs) + tk.clamp(min=0)).reshape(-1)
    run = _run(ids, r)
    kg = _gather(plan, kb, kf, ids, trows, r, run)
    s = torch.bmm(qc, kg.transpose(1, 2))
    deriv = cap(s, plan.softcap, need_grad)
    tok = None
    if plan.bias is not None or plan.padding is not None:
        tok = _token_ids(plan, r0, r1, s_count, t_count)
    if plan.bias is not None:
        s.add_(_term(plan, r0, r1, tok, s.dtype))
    inf = float("-inf")
    sb = s[:, :, : s_count * bs].view(r, bs, s_count, bs)
    if p_count:
        sb[:, :, :p_count].masked_fill_(_special_forbidden(plan, r0, r1, p_count, u_from), inf)
    if u_from < s_count:  # some rows of the chunk leave these slots unused
        sb[:, :, u_from:].masked_fill_((tb[:, None, u_from:, None] < 0), inf)
    if t_count:
        ok = (tk >= 0)[:, None, :]
        if plan.mask_fn is not None:
            qi = (plan.qb_idx[r0:r1, None, None] * bs + torch.arange(bs, device=tk.device)[None, :, None])
            ok = ok & plan.mask_fn(plan.b_idx[r0:r1, None, None], plan.h_idx[r0:r1, None, None],
                                   qi.clamp(max=plan.n_q - 1), tk.clamp(0, plan.n_kv - 1)[:, None, :])
        s[:, :, s_count * bs:].masked_fill_(~ok, inf)
    if plan.padding is not None:
        pad = plan.padding.reshape(-1)[plan.b_idx[r0:r1, None] * plan.n_kv + tok]
        s.masked_fill_(pad[:, None, :], inf)
    return s, (ids, run), trows, kg, tok, deriv


def _key_blocks(x, cdt, nkb, block):
    """(B, H, N, E) -> blocks (B·H·nkb, block, E) and the same storage as rows (B·H·nkb·block, E), zero past N."""
    x = x.to(cdt)
    if x.shape[2] != nkb * block:
        x = F.pad(x, (0, 0, 0, nkb * block - x.shape[2]))
    x = x.contiguous()
    return x.view(-1, block, x.shape[-1]), x.view(-1, x.shape[-1])


def _forward(q, k, v, plan: _Plan, scale):
    cdt = compute_dtype(q.dtype)
    bs, nqb = plan.block, -(-plan.n_q // plan.block)
    qp = _pad_rows(q.to(cdt), nqb, bs)  # scaled chunk by chunk, in cache
    kb, kf = _key_blocks(k, cdt, plan.nkb, bs)
    vb, vf = _key_blocks(v, cdt, plan.nkb, bs)
    out = torch.empty(qp.shape[0], bs, vf.shape[1], dtype=cdt, device=q.device)
    lse = torch.full((qp.shape[0], bs), float("-inf"), dtype=cdt, device=q.device)
    for chunk in plan.chunks:
        r0, r1, s_count, t_count = chunk[:4]
        if s_count + t_count == 0:
            out[r0:r1].zero_()
            continue
        s, ids, trows, _, _, _ = _chunk_scores(plan, qp[r0:r1] * scale, kb, kf, chunk)
        _, lse[r0:r1] = softmax_tile(s, _gather(plan, vb, vf, ids[0], trows, r1 - r0, ids[1]), out=out[r0:r1])
    return out, lse


def _unpad(x, b, h, n):
    """(B·H·nb, block, E) -> (B, H, N, E)."""
    return x.reshape(b, h, -1, *x.shape[2:])[:, :, :n]


def _scatter_add(plan: _Plan, blocks, flat, ids, trows, grads, s_count):
    """Adds a chunk's (r, S·block + T, E) key (or value) gradients into their blocks and single rows."""
    r, bs = grads.shape[0], plan.block
    ids, run = ids
    part = grads[:, : s_count * bs].reshape(r * s_count, bs, grads.shape[-1])
    if run is not None:
        blocks[run:run + ids.numel()].add_(part)
    else:
        blocks.index_add_(0, ids, part)
    if trows is not None:
        flat.index_add_(0, trows, grads[:, s_count * bs:].reshape(-1, grads.shape[-1]))


def _backward(q, k, v, out_p, dout, dlse, plan: _Plan, scale, params=()):
    cdt = compute_dtype(q.dtype)
    bs, nqb = plan.block, -(-plan.n_q // plan.block)
    qp = _pad_rows(q.to(cdt), nqb, bs)  # scaled chunk by chunk
    dop = _pad_rows(dout.to(cdt), nqb, bs)
    kb, kf = _key_blocks(k, cdt, plan.nkb, bs)
    vb, vf = _key_blocks(v, cdt, plan.nkb, bs)
    dl = None if dlse is None else _pad_rows(dlse.to(cdt)[..., None], nqb, bs)[..., 0]
    delta = delta_rows(dop, out_p, dl)
    dq = torch.zeros_like(qp)
    dkf, dvf = torch.zeros_like(kf), torch.zeros_like(vf)
    dkb, dvb = dkf.view_as(kb), dvf.view_as(vb)
    term_fn = float32_term(plan.bias) if params else None  # its half tables' gradients sum in float32
    params32 = bias_parameters(term_fn) if params else []
    param_grads = [torch.zeros_like(p, dtype=torch.float32 if p.dtype in HALF else p.dtype)
                   for p in params32]
    for chunk in plan.chunks:
        r0, r1, s_count, t_count = chunk[:4]
        if s_count + t_count == 0:
            continue
        qc = qp[r0:r1] * scale
        s, ids, trows, kg, tok, deriv = _chunk_scores(plan, qc, kb, kf, chunk, True)
        doc = dop[r0:r1]
        vg = _gather(plan, vb, vf, ids[0], trows, r1 - r0, ids[1])
        p, ds_final, ds = backward_tile(s, doc, vg, delta[r0:r1], deriv)
        _scatter_add(plan, dvb, dvf, ids, trows, torch.bmm(p.transpose(1, 2), doc), s_count)
        torch.bmm(ds, kg, out=dq[r0:r1]).mul_(scale)
        _scatter_add(plan, dkb, dkf, ids, trows, torch.bmm(ds.transpose(1, 2), qc), s_count)
        if params:  # dL/d(term) = dL/d(final score)
            with torch.enable_grad():
                grads = torch.autograd.grad(_term(plan, r0, r1, tok, cdt, term_fn), params32, ds_final,
                                            allow_unused=True)
            for acc, g in zip(param_grads, grads):
                if g is not None:
                    acc.add_(g)
    b, hq, n, _ = q.shape
    hkv, n_kv = k.shape[1], k.shape[2]
    dk = dkf.view(b, hkv, -1, dkf.shape[-1])[:, :, :n_kv]
    dv = dvf.view(b, hkv, -1, dvf.shape[-1])[:, :, :n_kv]
    param_grads = [g.to(p.dtype) for g, p in zip(param_grads, params)]
    return _unpad(dq, b, hq, n).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), param_grads


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, *params):
        out_p, lse_p = _forward(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, out_p, *params)
        ctx.plan, ctx.scale = plan, scale
        b, hq, n, _ = q.shape
        return _unpad(out_p, b, hq, n).to(q.dtype), _unpad(lse_p[..., None], b, hq, n)[..., 0]

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out_p, *params = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        dq, dk, dv, dparams = _backward(q, k, v, out_p, dout, dlse, ctx.plan, ctx.scale, tuple(params))
        return (dq, dk, dv, None, None, *dparams)


def blocksparse_attention(q, k, v, kv_blocks, block: int, scale: float, *, partial=None, mask_fn=None, kv_tokens=None,
                          bias=None, key_padding_mask=None, softcap=None):
    """Exact attention of each (b, h, query block) over its listed key blocks; returns ``(out, lse)``.

    ``q`` (B, Hq, Nq, D), ``k`` (B, Hkv, Nk, D), ``v`` (B, Hkv, Nk, Dv); ``kv_blocks``
    (B, Hq, ceil(Nq / block), S) int, key block indices (blocks of ``block`` tokens)
    or -1; ``partial`` (same shape, bool) marks slots masked elementwise by
    ``mask_fn(b, h, q_idx, kv_idx) -> bool`` (broadcast index tensors, FlexAttention's
    ``mask_mod`` contract); without ``partial`` the mask applies to every slot. A block
    listed twice is attended twice: list each once. ``kv_tokens`` (B, Hq, ceil(Nq /
    block), T) int, optional: single key tokens (or -1) gathered besides the blocks,
    always masked by ``mask_fn``; they must not lie in a listed block of the same
    query block (they would count twice). ``bias(h, q_idx, kv_idx)`` is an additive
    score term, ``key_padding_mask`` (B, Nk) bool marks keys to ignore, ``softcap``
    caps the scaled scores before the term (``foveal.kernels.core``). ``out`` has q's
    dtype, ``lse`` (B, Hq, Nq) float32 (float64 for float64 inputs). Differentiable in
    q, k, v and the tensors ``bias.parameters()`` returns.
    """
    check_tables(q, k, v, kv_blocks, block, partial, mask_fn, kv_tokens)
    plan = _plan(q, k, kv_blocks, block, partial, mask_fn, kv_tokens, bias, key_padding_mask, softcap)
    params = bias_parameters(bias) if bias is not None else []
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *params)):
        return _BlockSparse.apply(q, k, v, plan, float(scale), *params)
    out_p, lse_p = _forward(q, k, v, plan, float(scale))
    b, hq, n, _ = q.shape
    return _unpad(out_p, b, hq, n).to(q.dtype), _unpad(lse_p[..., None], b, hq, n)[..., 0]


#: block tables of static patterns, by pattern value and block size
TABLES = LRU("blocksparse tables", maxsize=64)


def layout_tables(pattern, block: int = 64):
    """A static pattern's block layout as blocksparse tables: ``(kv_blocks, partial)``, each (nqb, S).

    Full blocks are attended whole, partial ones masked by ``pattern.mask`` (cached by
    the pattern's value and ``block``).
    """

    def build():
        lay = pattern.layout(block, block)
        nqb = lay.num_q_blocks
        full_n = lay.full_indptr[1:] - lay.full_indptr[:-1]
        part_n = lay.partial_indptr[1:] - lay.partial_indptr[:-1]
        width = int((full_n + part_n).max()) if nqb else 0
        kv = torch.full((nqb, width), -1, dtype=torch.int64)
        partial = torch.zeros(nqb, width, dtype=torch.bool)
        rows_f = torch.repeat_interleave(torch.arange(nqb), full_n)
        rows_p = torch.repeat_interleave(torch.arange(nqb), part_n)
        col_f = torch.arange(rows_f.numel()) - torch.repeat_interleave(lay.full_indptr[:-1], full_n)
        col_p = torch.arange(rows_p.numel()) - torch.repeat_interleave(lay.partial_indptr[:-1], part_n)
        kv[rows_f, col_f] = lay.full_indices.long()
        kv[rows_p, full_n[rows_p] + col_p] = lay.partial_indices.long()
        partial[rows_p, full_n[rows_p] + col_p] = True
        return kv, partial

    return TABLES.get((pattern, block), build, pattern.cacheable)


def selection_block_mask(selection, device=None):
    """A FlexAttention ``BlockMask`` with per-(batch, head) tables for a ``BlockSelection``.

    Kept blocks not marked partial go to ``full_kv_indices``; partial blocks, blocks
    holding single kept tokens (``kv_tokens``) and full blocks on a ragged edge go to
    ``kv_indices``, masked by the selection's exact rule ``selection.mask``. Tables are
    padded to ``num_blocks`` columns (as FlexAttention's backward requires): block-level
    memory, B·H·num_blocks² int32. For ``torch.nn.attention.flex_attention(q, k, v,
    block_mask=...)`` with ``enable_gqa=True`` when key heads are fewer; on CUDA that is
    FlexAttention's fused kernel (not measured here: no GPU was available).

    The ``mask_mod`` is pointwise (a per-block rule table, then the selection's
    elementwise ``mask_fn``): compiled FlexAttention cannot reduce over a gathered row,
    as ``BlockSelection.mask`` does. ``attend(..., backend="flex")`` uses this. A
    selection with single key tokens that ``mask_fn`` does not imply
    (``tokens_in_mask_fn=False``) gets the general rule, right under eager
    FlexAttention only; ``attend`` refuses flex for it.
    """
    from torch.nn.attention.flex_attention import BlockMask

    kv, bs, n = selection.kv_blocks, selection.block, selection.n
    b, h, nb, _ = kv.shape
    if selection.partial is not None:
        partial = selection.partial
    else:
        partial = torch.full_like(kv, selection.mask_fn is not None, dtype=torch.bool)
    state = torch.zeros(b, h, nb, nb + 1, dtype=torch.int8, device=kv.device)  # last column: unused slots
    state.scatter_(-1, torch.where(kv >= 0, kv, nb), torch.where(partial, 1, 2).to(torch.int8))
    state = state[..., :nb]
    if selection.kv_tokens is not None and selection.kv_tokens.shape[-1]:
        tok = selection.kv_tokens
        single = torch.zeros(b, h, nb, nb + 1, dtype=torch.int8, device=kv.device)
        single.scatter_(-1, torch.where(tok >= 0, tok // bs, nb), torch.ones_like(tok, dtype=torch.int8))
        state = torch.maximum(state, single[..., :nb])
    pointwise = not (selection.kv_tokens is not None and selection.kv_tokens.shape[-1]) or (
        selection.mask_fn is not None and selection.tokens_in_mask_fn
    )
    rule = state.to(device)  # per block: 1 = apply mask_fn, 2 = every in-range pair
    if n % bs:  # FlexAttention masks a ragged tile through mask_mod: such blocks must be partial
        state = state.clone()
        state[:, :, -1] = torch.where(state[:, :, -1] == 2, 1, state[:, :, -1])
        state[..., -1] = torch.where(state[..., -1] == 2, 1, state[..., -1])

    def table(m):
        idx = torch.where(m, torch.arange(nb, device=m.device), nb).sort(-1).values
        return m.sum(-1).to(torch.int32).to(device), torch.where(idx < nb, idx, 0).to(torch.int32).to(device)

    kv_num, kv_idx = table(state == 1)
    full_num, full_idx = table(state == 2)
    fn, last = selection.mask_fn, nb - 1
    if not pointwise:  # single tokens not implied by mask_fn: the general rule (eager FlexAttention only)
        mask = selection.mask

        def general_mask_mod(b, h, q_idx, kv_idx):
            return mask(b, h, q_idx, kv_idx)

        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bs, bs), mask_mod=general_mask_mod, seq_lengths=(n, n)
        )

    def mask_mod(b, h, q_idx, kv_idx):
        # pointwise (no reductions), as compiled FlexAttention needs: the block's rule, then the elementwise one
        qc, kc = q_idx.clamp(max=n - 1), kv_idx.clamp(max=n - 1)
        r = rule[b, h, (qc // bs).clamp(max=last), (kc // bs).clamp(max=last)]
        inside = (q_idx < n) & (kv_idx < n)
        if fn is None:
            return inside & (r > 0)
        return inside & ((r == 2) | ((r == 1) & fn(b, h, qc, kc)))

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bs, bs), mask_mod=mask_mod, seq_lengths=(n, n)
    )
