"""The ``cpu`` backend: exact gather-based sparse attention in eager PyTorch, no compile step.

For each chunk of query groups (see ``foveal.kernels.plan``) it gathers the groups'
key/value sets, computes scores with batched matmuls, adds the mask only where the
chunk is not fully allowed, takes a numerically safe softmax and writes the output
and the log-sum-exp. The backward pass recomputes the scores from the saved
log-sum-exp (as FlashAttention does) and scatters key/value gradients back with
``index_add_``. GQA: the query heads sharing a key head are stacked as extra rows of
the same matmul, so keys and values are never repeated.

Working set: one chunk's scores, about ``SCORE_ELEMENTS`` elements, plus
O(tokens × head_dim) buffers; never O(N²). Runs on any device PyTorch runs on.
"""

from __future__ import annotations

import torch

from foveal.kernels.plan import GatherPlan, build_plan

__all__ = ["gather_attention", "plan_for"]

#: score elements held at once (all batch·head rows of a sub-batch of one chunk)
SCORE_ELEMENTS = 1 << 18


def plan_for(pattern, tile=None) -> GatherPlan:
    """The gather plan of ``pattern`` (cached on the pattern per tile)."""
    cache = pattern.__dict__.setdefault("_plan_cache", {})
    key = None if tile is None else tuple(tile)
    if key not in cache:
        cache[key] = build_plan(pattern, tile)
    return cache[key]


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_slots(x, plan_slot_token, groups):
    """(B, Hkv·G, N, E) -> (B·Hkv, slots, G, E): queries in slot order, a key head's query heads adjacent."""
    b, h, n, e = x.shape
    x = x.view(b, h // groups, groups, n, e).transpose(2, 3)
    return x.index_select(2, plan_slot_token).reshape(b * (h // groups), -1, groups, e)


def _from_slots(x, token_slot, batch, groups):
    """Inverse of ``_to_slots``: (B·Hkv, slots, G, E) -> (B, Hkv·G, N, E)."""
    bh, _, g, e = x.shape
    x = x.index_select(1, token_slot)
    n = token_slot.numel()
    return x.view(batch, bh // batch, n, g, e).transpose(2, 3).reshape(batch, (bh // batch) * g, n, e)


def _sub_batches(bh, rows, nk, shared: bool):
    """Ranges of batch·head rows processed together: one at a time when groups have their own masks."""
    step = max(1, SCORE_ELEMENTS // max(1, rows * nk)) if shared else 1
    return [(b0, min(b0 + step, bh)) for b0 in range(0, bh, step)]


def _scores(qs, kf, chunk, b0, b1, groups, size, cdt):
    """Scaled scores plus mask of one chunk for batch·head rows b0:b1: (nb·c, size·G, nk), and the gathered keys."""
    c, nk = chunk.keys.shape
    nb = b1 - b0
    keys = chunk.keys_on(qs.device)
    qc = qs[b0:b1, chunk.slots].reshape(nb * c, size * groups, -1)
    kc = kf[b0:b1].index_select(1, keys).view(nb * c, nk, -1)
    bias = chunk.bias(cdt, qs.device, groups)
    if bias is None:
        return torch.bmm(qc, kc.transpose(1, 2)), qc, kc
    return torch.baddbmm(bias, qc, kc.transpose(1, 2)), qc, kc


def _forward(q, k, v, plan: GatherPlan, scale: float, need_lse: bool = True):
    batch, hq, _, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    groups = hq // hkv
    cdt = _compute_dtype(q.dtype)
    slot_token, _ = plan.on(q.device)
    qs = _to_slots(q.to(cdt) * scale, slot_token, groups)  # (BH, S, G, D)
    kf = k.to(cdt).reshape(batch * hkv, -1, k.shape[-1])
    vf = v.to(cdt).reshape(batch * hkv, -1, dv)
    bh, slots = qs.shape[0], qs.shape[1]
    out = torch.empty(bh, slots, groups, dv, dtype=cdt, device=q.device)
    lse = torch.empty(bh, slots, groups, dtype=cdt, device=q.device) if need_lse else None
    size = plan.group_size
    for chunk in plan.chunks:
        c, nk = chunk.keys.shape
        keys = chunk.keys_on(q.device)
        empty = chunk.empty_on(q.device)
        for b0, b1 in _sub_batches(bh, c * size * groups, nk, chunk.shared):
            nb = b1 - b0
            s, _, _ = _scores(qs, kf, chunk, b0, b1, groups, size, cdt)
            vc = vf[b0:b1].index_select(1, keys).view(nb * c, nk, dv)
            if need_lse:
                m = s.amax(-1, keepdim=True)
                m.masked_fill_(m == float("-inf"), 0.0)
                s.sub_(m).exp_()
                denom = s.sum(-1, keepdim=True)
                o = torch.bmm(s, vc)
                alive = denom > 0
                o.div_(denom.masked_fill(~alive, 1.0))
                lse_c = torch.where(alive, denom.log() + m, float("-inf"))
                lse[b0:b1, chunk.slots] = lse_c.view(nb, c * size, groups)
            else:
                o = torch.bmm(torch.softmax(s, -1), vc)  # rows with no allowed key: NaN, zeroed below
                if empty is not None:
                    o.view(nb, c, size, groups * dv).masked_fill_(empty[None, :, :, None], 0.0)
            out[b0:b1, chunk.slots] = o.view(nb, c * size, groups, dv)
    return out, lse


def _backward(q, k, v, out_slots, lse_slots, dout, dlse, plan: GatherPlan, scale: float):
    batch, hq, _, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    groups = hq // hkv
    cdt = _compute_dtype(q.dtype)
    slot_token, token_slot = plan.on(q.device)
    qs = _to_slots(q.to(cdt) * scale, slot_token, groups)
    dos = _to_slots(dout.to(cdt), slot_token, groups)  # (BH, S, G, Dv)
    kf = k.to(cdt).reshape(batch * hkv, -1, d)
    vf = v.to(cdt).reshape(batch * hkv, -1, dv)
    # D_i = rowsum(dO ∘ O), less the gradient flowing into lse directly
    delta = (dos * out_slots).sum(-1)
    if dlse is not None:
        delta = delta - _to_slots(dlse.to(cdt)[..., None], slot_token, groups)[..., 0]
    lse_safe = lse_slots.masked_fill(lse_slots == float("-inf"), 0.0)
    bh, slots = qs.shape[0], qs.shape[1]
    dqs = torch.zeros(bh, slots, groups, d, dtype=cdt, device=q.device)
    dk = torch.zeros_like(kf)
    dvf = torch.zeros_like(vf)
    size = plan.group_size
    rows = size * groups
    for chunk in plan.chunks:
        c, nk = chunk.keys.shape
        keys = chunk.keys_on(q.device)
        for b0, b1 in _sub_batches(bh, c * rows, nk, chunk.shared):
            nb = b1 - b0
            p, qc, kc = _scores(qs, kf, chunk, b0, b1, groups, size, cdt)
            vc = vf[b0:b1].index_select(1, keys).view(nb * c, nk, dv)
            doc = dos[b0:b1, chunk.slots].reshape(nb * c, rows, dv)
            p.sub_(lse_safe[b0:b1, chunk.slots].reshape(nb * c, rows, 1)).exp_()
            dvc = torch.bmm(p.transpose(1, 2), doc)  # (nb·c, nk, Dv)
            dvf[b0:b1].index_add_(1, keys, dvc.view(nb, c * nk, dv))
            ds = torch.bmm(doc, vc.transpose(1, 2))
            ds.sub_(delta[b0:b1, chunk.slots].reshape(nb * c, rows, 1)).mul_(p)
            dqs[b0:b1, chunk.slots] = torch.bmm(ds, kc).view(nb, c * size, groups, d)
            dkc = torch.bmm(ds.transpose(1, 2), qc)
            dk[b0:b1].index_add_(1, keys, dkc.view(nb, c * nk, d))
    dq = _from_slots(dqs, token_slot, batch, groups).mul_(scale)
    return dq.to(q.dtype), dk.view_as(k).to(k.dtype), dvf.view_as(v).to(v.dtype)


def _run(q, k, v, plan, scale, need_lse=True):
    """Forward in caller order: (out, lse or None) plus the slot-order tensors the backward needs."""
    out_slots, lse_slots = _forward(q, k, v, plan, scale, need_lse)
    _, token_slot = plan.on(q.device)
    groups = q.shape[1] // k.shape[1]
    out = _from_slots(out_slots, token_slot, q.shape[0], groups).to(q.dtype)
    lse = None if lse_slots is None else _from_slots(lse_slots[..., None], token_slot, q.shape[0], groups)[..., 0]
    return out, lse, out_slots, lse_slots


class _GatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        out, lse, out_slots, lse_slots = _run(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, out_slots, lse_slots)
        ctx.plan, ctx.scale = plan, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out_slots, lse_slots = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        dq, dk, dv = _backward(q, k, v, out_slots, lse_slots, dout, dlse, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None


def gather_attention(q, k, v, pattern, scale: float, tile=None, need_lse: bool = True):
    """Exact attention over ``pattern`` by the gather kernel; returns ``(out, lse)`` with autograd.

    Without gradients and with ``need_lse=False`` it takes a faster path (a fused
    softmax) and returns ``lse=None``.
    """
    plan = plan_for(pattern, tile)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _GatherAttention.apply(q, k, v, plan, scale)
    out, lse, _, _ = _run(q, k, v, plan, scale, need_lse)
    return out, lse
