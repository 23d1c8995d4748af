"""The ``cpu`` backend: exact gather-based sparse attention in eager PyTorch, no compile step.

For each chunk of query groups (see ``foveal.kernels.plan``) it gathers the groups'
key/value sets, computes scores with batched matmuls, adds the mask only where the
chunk is not fully allowed (plus score terms and key padding), and hands the tile
to the shared FlashAttention-style core (``foveal.kernels.core``): a numerically
safe softmax writing the output and the log-sum-exp, and a backward pass that
recomputes the scores from the saved log-sum-exp. Key/value gradients are scattered
back with ``index_add_``. GQA: the query heads sharing a key head are stacked as extra rows of
the same matmul, so keys and values are never repeated.

Working set: one chunk's scores (``plan.CHUNK_ELEMENTS`` per batch·head row), plus
O(tokens × head_dim) buffers; never O(N²). Runs on any device PyTorch runs on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from foveal.bias import bias_parameters, float32_term, table_geometry
from foveal.cache import LRU
from foveal.inputs import HALF, check_qkv
from foveal.kernels.core import backward_tile, cap, compute_dtype, delta_rows, softmax_tile
from foveal.kernels.plan import GatherPlan, build_plan

__all__ = ["gather_attention", "plan_for", "PLANS"]

#: score elements one sub-batch holds across batch·head rows, for chunks whose groups
#: share a mask (a plan chunk itself holds up to ``plan.CHUNK_ELEMENTS`` per row)
SCORE_ELEMENTS = 1 << 18


#: gather plans by pattern value and tile: a pattern built anew with equal parameters reuses its plan
PLANS = LRU("gather plans", maxsize=64)


def plan_for(pattern, tile=None) -> GatherPlan:
    """The gather plan of ``pattern`` for ``tile`` (cached by the pattern's value, bounded)."""
    tile = None if tile is None else tuple(tile)
    return PLANS.get((pattern, tile), lambda: build_plan(pattern, tile), pattern.cacheable)


def _take_rows(x, index):
    """``x[i, index]`` for every i of ``x`` (rows, n, e): (rows, len(index), e).

    One ``embedding`` call over the flattened rows: several times faster on CPU than
    ``index_select`` along a middle dimension.
    """
    rows, n, e = x.shape
    flat = (torch.arange(rows, device=x.device)[:, None] * n + index[None, :]).flatten()
    return F.embedding(flat, x.reshape(rows * n, e)).view(rows, index.numel(), e)


def _to_slots(x, plan_slot_token, groups):
    """(B, Hkv·G, N, E) -> (B·Hkv, slots, G, E): queries in slot order, a key head's query heads adjacent."""
    b, h, n, e = x.shape
    x = x.reshape(b, h // groups, groups, n, e).transpose(2, 3).reshape(b * (h // groups), n, groups * e)
    return _take_rows(x, plan_slot_token).view(b * (h // groups), -1, groups, e)


def _from_slots(x, token_slot, batch, groups, identity: bool = False):
    """Inverse of ``_to_slots``: (B·Hkv, slots, G, E) -> (B, Hkv·G, N, E); a view for identity plans without GQA."""
    bh, _, g, e = x.shape
    if identity and g == 1:
        return x.view(batch, bh // batch, -1, e)
    x = _take_rows(x.reshape(bh, -1, g * e), token_slot).view(bh, -1, g, e)
    n = token_slot.numel()
    return x.view(batch, bh // batch, n, g, e).transpose(2, 3).reshape(batch, (bh // batch) * g, n, e)


def _sub_batches(bh, rows, nk, shared: bool):
    """Ranges of batch·head rows processed together: one at a time when groups have their own masks."""
    step = max(1, SCORE_ELEMENTS // max(1, rows * nk)) if shared else 1
    return [(b0, min(b0 + step, bh)) for b0 in range(0, bh, step)]


def _gather(xf, chunk, b0, b1):
    """Keys (or values) of a chunk for batch·head rows b0:b1, as (nb·c, nk, E): a view where possible."""
    c, nk = chunk.keys.shape
    nb, e = b1 - b0, xf.shape[2]
    stride = chunk.key_stride
    if stride is not None and nb == 1:
        # xf may be a strided view (k sliced out of a fused qkv): use its real strides
        first, step = stride
        s0, s1, s2 = xf.stride()
        return xf.as_strided((c, nk, e), (step * s1, s1, s2), xf.storage_offset() + b0 * s0 + first * s1)
    return _take_rows(xf[b0:b1], chunk.keys_on(xf.device)).view(nb * c, nk, e)


def _scores(qs, kf, chunk, b0, b1, groups, size, cdt, alpha, softcap=None, need_grad=False):
    """Final scores of one chunk for batch·head rows b0:b1: (nb·c, size·G, nk), plus q, k and the cap's derivative.

    ``alpha``·q·kᵀ, capped (``core.cap``), plus the mask term; score terms and key
    padding are added by the caller.
    """
    c, nk = chunk.keys.shape
    nb = b1 - b0
    qc = qs[b0:b1, chunk.slots].reshape(nb * c, size * groups, -1)
    kc = _gather(kf, chunk, b0, b1)
    mask = chunk.bias(cdt, qs.device, groups)
    if mask is not None and softcap is None:
        return torch.baddbmm(mask, qc, kc.transpose(1, 2), alpha=alpha), qc, kc, None
    s = torch.bmm(qc, kc.transpose(1, 2))
    if alpha != 1.0:
        s.mul_(alpha)
    deriv = cap(s, softcap, need_grad)
    if mask is not None:
        s.add_(mask)
    return s, qc, kc, deriv


def _query_slots(q, plan, groups, cdt, scale):
    """Queries in slot order as (BH, S, G, D), and the factor still to apply to the scores.

    An identity plan without GQA needs no copy: the scale is applied in the matmul.
    """
    if plan.identity and groups == 1 and q.dtype == cdt:
        b, h, n, d = q.shape
        return q.reshape(b * h, n, 1, d), scale
    slot_token, _ = plan.on(q.device)
    return _to_slots(q.to(cdt) * scale, slot_token, groups), 1.0


def _table_index(bias, chunk, qtok, keys, device):
    """The chunk's flat table index (c or 1, size, nk), cached per geometry: one row when every group reads the
    table at the same offsets wherever the mask allows (a window's groups), else one per group."""
    key = ("table index", bias.geometry, str(device))
    if key not in chunk._cache:
        c, size, nk = qtok.shape[1], qtok.shape[2], keys.shape[-1]
        index = torch.broadcast_to(bias.table_index(qtok, keys), (1, c, size, nk))[0]
        same = index == index[:1]
        if chunk.allowed is not None:
            same |= ~chunk.allowed.to(device)  # masked pairs' terms are never used
        chunk._cache[key] = index[:1].contiguous() if bool(same.all()) else index.contiguous()
    return chunk._cache[key]


def _chunk_bias(bias, plan: GatherPlan, chunk, hq: int, hkv: int, cdt, device):
    """The score term of one chunk for every query head, arranged like the scores: (Hkv, c or 1, size·G, nk).

    A term read from a table (``table_index``/``gather``, e.g. ``RelativePositionBias``) is one gather through
    an index the chunk caches per geometry, a single group's (broadcast over the chunk) where all groups share
    it; any other term is evaluated on the chunk's (head, query, key).
    """
    c, nk = chunk.keys.shape
    size, groups = plan.group_size, hq // hkv
    slot_token, _ = plan.on(device)
    qtok = slot_token[chunk.slots].view(1, c, size, 1)
    keys = chunk.keys_on(device).view(1, c, 1, nk)
    if table_geometry(bias) is not None:
        index = _table_index(bias, chunk, qtok, keys, device)
        c = index.shape[0]
        vals = torch.broadcast_to(bias.gather(index), (hq, c, size, nk)).to(cdt)
    else:
        h = torch.arange(hq, device=device)[:, None, None, None]
        vals = torch.broadcast_to(bias(h, qtok, keys), (hq, c, size, nk)).to(cdt)
    return vals.view(hkv, groups, c, size, nk).permute(0, 2, 3, 1, 4).reshape(hkv, c, size * groups, nk)


def _add_terms(s, vals, padding, chunk, b0, b1, hkv):
    """Add the chunk's score term and mask padded keys, for batch·head rows b0:b1 (row ``bh``: key head
    ``bh % Hkv``, batch element ``bh // Hkv``)."""
    nb = b1 - b0
    if vals is not None:  # (Hkv, c or 1, rows, nk): one group's term broadcast over the chunk's groups
        rows = torch.arange(b0, b1, device=vals.device) % hkv
        s.view(nb, chunk.keys.shape[0], *vals.shape[2:]).add_(vals[rows] if nb > 1 else vals[b0 % hkv][None])
    if padding is not None:
        c, nk = chunk.keys.shape
        batch = torch.arange(b0, b1, device=padding.device) // hkv
        pad = padding[batch][:, chunk.keys_on(padding.device)].view(nb, c, 1, nk)
        s.view(nb, c, -1, nk).masked_fill_(pad, float("-inf"))


def _forward(q, k, v, plan: GatherPlan, scale: float, need_lse: bool = True, bias=None, padding=None, softcap=None):
    batch, hq, _, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    groups = hq // hkv
    cdt = compute_dtype(q.dtype)
    need_lse = need_lse or padding is not None  # rows emptied by padding are only known through lse
    qs, alpha = _query_slots(q, plan, groups, cdt, scale)  # (BH, S, G, D)
    kf = k.to(cdt).reshape(batch * hkv, -1, k.shape[-1])
    vf = v.to(cdt).reshape(batch * hkv, -1, dv)
    bh, slots = qs.shape[0], qs.shape[1]
    out = torch.empty(bh, slots, groups, dv, dtype=cdt, device=q.device)
    lse = torch.empty(bh, slots, groups, dtype=cdt, device=q.device) if need_lse else None
    size = plan.group_size
    for chunk in plan.chunks:
        c, nk = chunk.keys.shape
        empty = chunk.empty_on(q.device)
        vals = None if bias is None else _chunk_bias(bias, plan, chunk, hq, hkv, cdt, q.device)
        for b0, b1 in _sub_batches(bh, c * size * groups, nk, chunk.shared and chunk.key_stride is None):
            nb = b1 - b0
            s, _, _, _ = _scores(qs, kf, chunk, b0, b1, groups, size, cdt, alpha, softcap)
            _add_terms(s, vals, padding, chunk, b0, b1, hkv)
            target = out[b0:b1, chunk.slots]
            o, lse_c = softmax_tile(s, _gather(vf, chunk, b0, b1), target, need_lse)
            if need_lse:
                lse[b0:b1, chunk.slots] = lse_c.view(nb, c * size, groups)
            elif empty is not None:  # the fused softmax leaves NaN on rows with no allowed key
                o.view(nb, c, size, groups * dv).masked_fill_(empty[None, :, :, None], 0.0)
            if o.data_ptr() != target.data_ptr():
                target.copy_(o.view(target.shape))
    return out, lse


def _backward(q, k, v, out_slots, dout, dlse, plan: GatherPlan, scale: float, bias=None, params=(),
              padding=None, softcap=None):
    batch, hq, _, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    groups = hq // hkv
    cdt = compute_dtype(q.dtype)
    slot_token, token_slot = plan.on(q.device)
    qs, alpha = _query_slots(q, plan, groups, cdt, scale)
    dos = _to_slots(dout.to(cdt), slot_token, groups)  # (BH, S, G, Dv)
    kf = k.to(cdt).reshape(batch * hkv, -1, d)
    vf = v.to(cdt).reshape(batch * hkv, -1, dv)
    dl = None if dlse is None else _to_slots(dlse.to(cdt)[..., None], slot_token, groups)[..., 0]
    delta = delta_rows(dos, out_slots, dl)
    bh, slots = qs.shape[0], qs.shape[1]
    dqs = torch.zeros(bh, slots, groups, d, dtype=cdt, device=q.device)
    dk = torch.zeros_like(kf)
    dvf = torch.zeros_like(vf)
    size = plan.group_size
    rows = size * groups
    term_fn = float32_term(bias) if params else None  # its half tables' gradients sum in float32, chunk by chunk
    params32 = bias_parameters(term_fn) if params else []
    param_grads = [torch.zeros_like(p, dtype=torch.float32 if p.dtype in HALF else p.dtype)
                   for p in params32]
    for chunk in plan.chunks:
        c, nk = chunk.keys.shape
        keys = chunk.keys_on(q.device)
        vals = None if bias is None else _chunk_bias(bias, plan, chunk, hq, hkv, cdt, q.device)
        dvals = None if not params else torch.zeros_like(vals)
        for b0, b1 in _sub_batches(bh, c * rows, nk, chunk.shared and chunk.key_stride is None):
            nb = b1 - b0
            s, qc, kc, deriv = _scores(qs, kf, chunk, b0, b1, groups, size, cdt, alpha, softcap, True)
            _add_terms(s, vals, padding, chunk, b0, b1, hkv)
            vc = _gather(vf, chunk, b0, b1)
            doc = dos[b0:b1, chunk.slots].reshape(nb * c, rows, dv)
            p, ds_final, ds = backward_tile(s, doc, vc, delta[b0:b1, chunk.slots].reshape(nb * c, rows), deriv)
            dvf[b0:b1].index_add_(1, keys, torch.bmm(p.transpose(1, 2), doc).view(nb, c * nk, dv))
            if dvals is not None:  # dL/d(term) = dL/d(final score), summed over the batch (and a shared term's groups)
                dterm = ds_final.view(nb, c, rows, nk)
                dvals.index_add_(0, torch.arange(b0, b1, device=q.device) % hkv,
                                 dterm.sum(1, keepdim=True) if dvals.shape[1] == 1 and c > 1 else dterm)
            dqs[b0:b1, chunk.slots] = torch.bmm(ds, kc).view(nb, c * size, groups, d)
            dkc = torch.bmm(ds.transpose(1, 2), qc)
            if alpha != 1.0:
                dkc.mul_(alpha)
            dk[b0:b1].index_add_(1, keys, dkc.view(nb, c * nk, d))
        if dvals is not None:
            with torch.enable_grad():
                term = _chunk_bias(term_fn, plan, chunk, hq, hkv, cdt, q.device)
                grads = torch.autograd.grad(term, params32, dvals, allow_unused=True)
            for acc, g in zip(param_grads, grads):
                if g is not None:
                    acc.add_(g)
    dq = _from_slots(dqs, token_slot, batch, groups, plan.identity).mul_(scale)
    param_grads = [g.to(p.dtype) for g, p in zip(param_grads, params)]
    return dq.to(q.dtype), dk.view_as(k).to(k.dtype), dvf.view_as(v).to(v.dtype), param_grads


def _run(q, k, v, plan, scale, need_lse=True, bias=None, padding=None, softcap=None):
    """Forward in caller order: (out, lse or None) plus the slot-order tensors the backward needs."""
    out_slots, lse_slots = _forward(q, k, v, plan, scale, need_lse, bias, padding, softcap)
    _, token_slot = plan.on(q.device)
    groups = q.shape[1] // k.shape[1]
    out = _from_slots(out_slots, token_slot, q.shape[0], groups, plan.identity).to(q.dtype)
    lse = None if lse_slots is None else _from_slots(lse_slots[..., None], token_slot, q.shape[0], groups, plan.identity)[..., 0]
    return out, lse, out_slots, lse_slots


class _GatherAttention(torch.autograd.Function):
    """Autograd over the gather kernel; the score term's parameters are explicit inputs."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, bias, padding, softcap, *params):
        out, lse, out_slots, _ = _run(q, k, v, plan, scale, True, bias, padding, softcap)
        ctx.save_for_backward(q, k, v, out_slots, *params)
        ctx.plan, ctx.scale, ctx.bias, ctx.padding, ctx.softcap = plan, scale, bias, padding, softcap
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out_slots, *params = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        dq, dk, dv, dparams = _backward(
            q, k, v, out_slots, dout, dlse, ctx.plan, ctx.scale, ctx.bias, tuple(params),
            ctx.padding, ctx.softcap,
        )
        return (dq, dk, dv, None, None, None, None, None, *dparams)


def gather_attention(q, k, v, pattern, scale: float, tile=None, *, need_lse: bool = True, bias=None,
                     key_padding_mask=None, softcap=None):
    """Exact attention over ``pattern`` by the gather kernel; returns ``(out, lse)``.

    ``bias`` is an additive score term, ``key_padding_mask`` (B, n_kv) bool marks keys
    to ignore, ``softcap`` caps the scaled scores (``core.cap``, before the terms).
    Differentiable in q, k, v and the tensors ``bias.parameters()`` returns. Without
    gradients and with ``need_lse=False`` it takes a faster path (a fused softmax) and
    returns ``lse=None``.
    """
    check_qkv(q, k, v)
    plan = plan_for(pattern, tile)
    params = bias_parameters(bias) if bias is not None else []
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *params)):
        return _GatherAttention.apply(q, k, v, plan, scale, bias, key_padding_mask, softcap, *params)
    out, lse, _, _ = _run(q, k, v, plan, scale, need_lse, bias, key_padding_mask, softcap)
    return out, lse
