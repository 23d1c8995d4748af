"""Neighbourhood attention over exactly the pairs a ``Neighborhood`` allows: the native CPU kernel (issue 20).

``native_neighborhood_attention(q, k, v, pattern, scale)`` runs ``csrc/neighborhood.cpp``:
each query computes its scores against its own keys only (at most ``prod(kernel_size)``:
49 for a 7×7 window, where the eager ``cpu`` kernel's tiles compute about 196), with
NATTEN's definition as ``foveal.patterns.Neighborhood`` states it — 1-, 2- and 3-D
grids, dilation, stride groups, per-axis causal — read from the pattern's own
``progression`` (first key and count per axis coordinate), so the kernel has no second
copy of the definition.

How it runs. Forward: W queries of one grid row (W = the vector width: 16 float32 on
AVX-512) whose windows on the last axis shift by one key per query — every query away
from the borders, with or without dilation, unless the last axis has a stride — form a
tile: with q, k, v copied to a row-transposed layout ((D, L_last) blocks per grid row, in
a per-thread workspace kept between calls), every score, the softmax and every output
channel is a full-width vector operation over the tile's queries (no horizontal sums, no
gathers); the other queries (borders, strided last axis, key padding) run one at a time,
vectorised over head_dim. Backward (P recomputed from the lse): pass 1 per query (the
same tiles) gives dq and stores P and dS per (window slot, query); pass 2 per key gives
dk and dv over NATTEN's inverse neighbourhood — the queries whose window holds the key,
tiled the same way — so each key is written by one task: no atomics, no per-thread
copies of dk/dv. Parallel over (batch, head, grid rows) with ``at::parallel_for``.

GQA, key padding, softcap, learned sink logits (a zero-value extra key joining every
row's softmax) and ``RelativePositionBias`` score terms on the pattern's grid with their
table's gradient (NAT's ``rpb``). Computes in float32 for float32 and in float64 for
float64; bfloat16 and float16 inputs are converted to float32 here (outputs converted
back, lse float32). Memory: the backward keeps P and dS per (query, window slot),
``2·B·Hq·N·prod(kernel_size)`` numbers (a third such buffer for a learned table), never
N×N; a forward whose inputs want a gradient keeps its row-transposed q, k, v for the
backward (as many numbers as q, k, v; the backward then transposes dO only and computes
delta = rowsum(dO ∘ O) itself); other transposed copies are kept per calling thread up to
2^24 numbers.
"""

from __future__ import annotations

import math

import torch

from foveal.inputs import lse_dtype
from foveal.kernels import native
from foveal.patterns.local import Neighborhood

__all__ = ["native_neighborhood_attention", "why_not", "tables"]

_TABLES: dict = {}
_MAX_TABLES = 64


def _cached(key, make):
    if key not in _TABLES:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        _TABLES[key] = make()
    return _TABLES[key]


def tables(pattern: Neighborhood) -> dict:
    """The kernel's per-axis tables of ``pattern`` (grids padded to 3 axes with leading length-1 axes).

    ``geometry`` (3, 3): grid, kernel_size, dilation per axis; ``first``/``count`` (3, Lmax): each
    coordinate's first key and number of keys (step = dilation); ``inv_ptr`` (3, Lmax + 1),
    ``inv_x``/``inv_m`` (3, E): for each key coordinate, the query coordinates whose window holds
    it and the key's place in that window (CSR), the inverse neighbourhood of the backward.
    """
    return _cached(("na", pattern._key()), lambda: _make_tables(pattern))


def _axes(pattern):
    nd = len(pattern.shape)
    pad = 3 - nd
    return ((1,) * pad + tuple(pattern.shape), (1,) * pad + tuple(pattern.kernel_size),
            (1,) * pad + tuple(pattern.dilation), pad)


def _make_tables(pattern):
    shape, ks, dil, pad = _axes(pattern)
    lmax = max(shape)
    first = torch.zeros(3, lmax, dtype=torch.int64)
    count = torch.zeros(3, lmax, dtype=torch.int64)
    inv = []
    for a in range(3):
        x = torch.arange(shape[a])
        if a < pad:
            f, c = torch.zeros_like(x), torch.ones_like(x)
        else:
            f, step, c = pattern.progression(a - pad, x)
            if not bool((step == dil[a]).all()) or int(c.max()) > ks[a] or int(c.min()) < 1:
                raise AssertionError(f"Neighborhood.progression gave an unexpected step or count on axis {a - pad}")
        first[a, : shape[a]], count[a, : shape[a]] = f, c
        m = torch.arange(ks[a])
        ok = m[None, :] < c[:, None]
        xs, ms = torch.broadcast_tensors(x[:, None], m[None, :])
        xs, ms = xs[ok], ms[ok]
        ys = f[xs] + ms * dil[a]
        order = torch.argsort(ys * (lmax * ks[a]) + xs * ks[a] + ms)
        xs, ms, ys = xs[order], ms[order], ys[order]
        ptr = torch.zeros(lmax + 1, dtype=torch.int64)
        ptr[1 : shape[a] + 1] = torch.bincount(ys, minlength=shape[a]).cumsum(0)
        ptr[shape[a] + 1 :] = ptr[shape[a]]
        inv.append((ptr, xs, ms))
    e = max(len(xs) for _, xs, _ in inv)
    inv_x = torch.zeros(3, e, dtype=torch.int64)
    inv_m = torch.zeros(3, e, dtype=torch.int64)
    for a, (_, xs, ms) in enumerate(inv):
        inv_x[a, : len(xs)], inv_m[a, : len(ms)] = xs, ms
    geometry = torch.tensor([shape, ks, dil], dtype=torch.int64)
    return dict(geometry=geometry, first=first, count=count, inv_ptr=torch.stack([p for p, _, _ in inv]),
                inv_x=inv_x, inv_m=inv_m)


def _bias_index(pattern, bias):
    """(3, Lmax, kk) offsets into ``bias.table[h].flatten()`` per axis, coordinate and window place, whose
    sum over the axes is the flat table index of a pair; and (N, prod(kernel_size)) that flat index
    per (query, window slot) for the table's gradient (slots beyond a causal row's keys hold a valid
    index with a zero gradient)."""
    def make():
        t = tables(pattern)
        shape, ks, dil, pad = _axes(pattern)
        lmax, kk = max(shape), max(ks)
        sizes = [2 * mo + 1 for mo in bias.max_offset]
        strides = [math.prod(sizes[a + 1:]) for a in range(len(sizes))]
        index = torch.zeros(3, lmax, kk, dtype=torch.int64)
        for a in range(pad, 3):
            ax = a - pad
            x = torch.arange(shape[a])
            y = t["first"][a, : shape[a], None] + torch.arange(kk)[None, :] * dil[a]
            off = y - x[:, None]
            st = bias.step[ax]
            off = off if st == 1 else torch.div(off, st, rounding_mode="floor")
            mo = bias.max_offset[ax]
            index[a, : shape[a]] = (off.clamp(-mo, mo) + mo) * strides[ax]
        # flat index per (query, slot): the sum over axes, in the kernel's slot order
        per_axis = [index[a, : shape[a], : ks[a]] for a in range(3)]
        flat = (per_axis[0][:, None, None, :, None, None] + per_axis[1][None, :, None, None, :, None]
                + per_axis[2][None, None, :, None, None, :])
        return index, flat.reshape(math.prod(shape), math.prod(ks))

    return _cached(("rpb", pattern._key(), bias.geometry), make)


def why_not(q, k, v, pattern, *, bias=None, key_padding_mask=None, softcap=None) -> list[str]:
    """Reasons the native neighbourhood kernel cannot run this call (empty when it can)."""
    reasons = []
    if not isinstance(pattern, Neighborhood):
        reasons.append("the native neighbourhood kernel runs a bare Neighborhood only (not composed patterns, "
                       f"got {type(pattern).__name__})")
    else:
        if len(pattern.shape) > 3:
            reasons.append("the native neighbourhood kernel runs 1-, 2- and 3-D grids")
    reasons += native.common_reasons(q, "the native neighbourhood kernel")
    if bias is not None:
        from foveal.bias import RelativePositionBias

        if not isinstance(bias, RelativePositionBias):
            reasons.append("the native neighbourhood kernel takes RelativePositionBias score terms only, got "
                           f"{type(bias).__name__}")
        elif isinstance(pattern, Neighborhood) and tuple(bias.grid) != tuple(pattern.shape):
            reasons.append(f"the RelativePositionBias grid {bias.grid} is not the pattern's grid {pattern.shape}")
        elif bias.table.shape[0] != q.shape[1]:
            reasons.append(f"the RelativePositionBias table has {bias.table.shape[0]} heads, q has {q.shape[1]}")
    return reasons


class _NeighborhoodAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, table, pattern, bias, scale, key_padding_mask, softcap):
        t = tables(pattern)
        bias_index, flat = _bias_index(pattern, bias) if bias is not None else (None, None)
        # with a gradient to come, the forward keeps its row-transposed q, k, v for the backward (3 copies of the
        # inputs' size, kept until then) so that it transposes grad_out only
        keep = any(ctx.needs_input_grad[:3]) or bool(ctx.needs_input_grad[4])
        out, lse, transposed = native.ops().na_forward(
            q=q, k=k, v=v, geometry=t["geometry"], first=t["first"], count=t["count"], scale=scale,
            key_padding_mask=key_padding_mask, softcap=softcap, sink_logits=sink, bias_table=table,
            bias_index=bias_index, keep_transposed=keep,
        )
        ctx.save_for_backward(q, k, v, out, lse, sink, table, key_padding_mask, transposed)
        ctx.pattern, ctx.bias_index, ctx.flat, ctx.scale, ctx.softcap = pattern, bias_index, flat, scale, softcap
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, sink, table, kpm, transposed = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = grad_out.contiguous()
        t = tables(ctx.pattern)
        need_table = table is not None and ctx.needs_input_grad[4]
        # delta = rowsum(grad_out ∘ out) − grad_lse, computed by the kernel (and returned for the sinks' gradient)
        dq, dk, dv, dpairs, delta = native.ops().na_backward(
            grad_out=grad_out, q=q, k=k, v=v, out=out, lse=lse,
            grad_lse=None if grad_lse is None else grad_lse.contiguous(), geometry=t["geometry"],
            first=t["first"], count=t["count"], inv_ptr=t["inv_ptr"], inv_x=t["inv_x"], inv_m=t["inv_m"],
            scale=ctx.scale, key_padding_mask=kpm, softcap=ctx.softcap, bias_table=table,
            bias_index=ctx.bias_index, need_bias_grad=need_table, transposed=transposed,
        )
        dsink = dtable = None
        if sink is not None and ctx.needs_input_grad[3]:
            # the sink's probability exp(sink − lse); d sink = −Σ p_sink · delta (rows with lse = −inf have none)
            p_sink = torch.exp(sink[None, :, None] - lse)
            dsink = -(p_sink * delta).sum((0, 2))
        if need_table:
            dtable = torch.zeros_like(table)
            flat = ctx.flat.expand(*dpairs.shape[:2], *ctx.flat.shape)
            dtable.scatter_add_(1, flat.transpose(0, 1).reshape(table.shape[0], -1),
                                dpairs.transpose(0, 1).reshape(table.shape[0], -1))
        return dq, dk, dv, dsink, dtable, None, None, None, None, None


def native_neighborhood_attention(q, k, v, pattern, scale=None, *, key_padding_mask=None, softcap=None,
                                  sink_logits=None, bias=None, need_lse=True):
    """Neighbourhood attention of ``q`` (B, Hq, N, D) over ``k`` (B, Hkv, N, D), ``v`` (B, Hkv, N, Dv) on
    ``pattern`` (a ``Neighborhood`` with ``prod(grid) == N``), exactly the pairs it allows.

    ``scale`` defaults to ``1/sqrt(D)``; ``key_padding_mask`` (B, N) bool, True = ignored;
    ``softcap`` caps ``scale·q·k`` as ``softcap·tanh(s / softcap)``; ``bias`` a
    ``RelativePositionBias`` on the pattern's grid, added after the cap; ``sink_logits``
    (Hq,) a learned logit per query head joining every row's softmax with a zero value.
    Returns ``(out, lse)`` — ``lse`` (B, Hq, N) float32 (float64 for float64 inputs),
    ``-inf`` for a row with no key and no sink, whose output is zero — or ``out`` alone
    without ``need_lse``. Differentiable in q, k, v, ``sink_logits`` and the bias table.
    """
    reasons = why_not(q, k, v, pattern, bias=bias, key_padding_mask=key_padding_mask, softcap=softcap)
    if reasons:
        raise ValueError("native neighbourhood attention cannot run this call: " + "; ".join(reasons))
    n = math.prod(pattern.shape)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] != n or k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"q, k, v must be (B, H, {n}, D) for {pattern!r}, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key heads ({k.shape[1]}) and k, v "
                         "must have the same heads")
    in_dtype = q.dtype
    cdt = lse_dtype(in_dtype)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    qc, kc, vc = (x.to(cdt).contiguous() for x in (q, k, v))
    sink = sink_logits.to(cdt).contiguous() if sink_logits is not None else None
    table = bias.table.to(cdt).reshape(bias.table.shape[0], -1).contiguous() if bias is not None else None
    kpm = key_padding_mask.to(torch.bool).contiguous() if key_padding_mask is not None else None
    out, lse = _NeighborhoodAttention.apply(qc, kc, vc, sink, table, pattern, bias, scale, kpm,
                                            None if softcap is None else float(softcap))
    out = out.to(in_dtype)
    if need_lse:
        return out, (lse if cdt == torch.float64 else lse.float())
    return out


# -- the backend's side (foveal.kernels.select) -------------------------------------------
def call_why_not(call) -> list[str]:
    """Reasons the kernel cannot run a lowered ``Call`` of ``attend`` (empty when it can)."""
    return why_not(call.q, call.k, call.v, call.pattern, bias=call.bias, key_padding_mask=call.key_padding_mask,
                   softcap=call.softcap)


def call_run(call):
    """``(out, lse)`` of a lowered ``Call`` (lse None when the call does not want it)."""
    out, lse = native_neighborhood_attention(call.q, call.k, call.v, call.pattern, call.scale,
                                             key_padding_mask=call.key_padding_mask, softcap=call.softcap,
                                             bias=call.bias)
    return out, (lse if call.need_lse else None)
