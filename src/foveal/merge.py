"""``merge_attentions``: one softmax over the union of disjoint key sets, from each set's output and lse;
``add_sink``: the same softmax joined by one learned sink logit per head (a key whose value is zero)."""

from __future__ import annotations

import torch

from foveal.inputs import check_sink_logits, lse_dtype

__all__ = ["merge_attentions", "add_sink"]


def merge_attentions(outs, lses, sink_logits=None):
    """Combine attention over disjoint key sets into attention over their union; returns ``(out, lse)``.

    ``outs`` is a sequence of (B, H, N, Dv) outputs, ``lses`` the matching (B, H, N)
    log-sum-exps (as ``attend(..., return_lse=True)`` gives them). The result is
    ``out = Σ_i exp(lse_i − lse)·out_i`` with ``lse = log Σ_i exp(lse_i)``: exactly what
    one softmax over all the keys gives (FlashAttention's split-KV and ring attention
    merge). It runs in the lse dtype rule of ``foveal.inputs``: float64 for float64
    outputs, float32 otherwise; ``out`` keeps the first output's dtype, ``lse`` is in the
    compute dtype. A query with no key in any set (every ``lse_i = -inf``) gets a zero
    output and ``lse = -inf``, never NaN.

    ``sink_logits`` (H,), if given, joins the merged softmax once (``add_sink``): merge
    outputs computed *without* the sink, so that it counts once however many key sets
    there are (split-KV, ring attention).
    """
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_attentions needs as many outputs as lses (at least one), got {len(outs)} and {len(lses)}")
    for i, (o, s) in enumerate(zip(outs, lses)):
        if not isinstance(o, torch.Tensor) or not isinstance(s, torch.Tensor):
            raise TypeError(f"outs[{i}] and lses[{i}] must be tensors, got {type(o).__name__} and {type(s).__name__}")
        if o.dim() != 4 or tuple(s.shape) != tuple(o.shape[:3]) or o.shape != outs[0].shape:
            raise ValueError(
                f"outs[{i}] must be (B, H, N, Dv) like outs[0] {tuple(outs[0].shape)} and lses[{i}] its (B, H, N); "
                f"got {tuple(o.shape)} and {tuple(s.shape)}"
            )
    cdt = lse_dtype(outs[0].dtype)
    stacked = torch.stack([s.to(cdt) for s in lses])  # (P, B, H, N)
    top = stacked.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(stacked - top)  # exp(-inf) = 0 for empty sets
    total = w.sum(0)
    alive = total > 0
    safe = torch.where(alive, total, torch.ones_like(total))
    out = sum(wi[..., None] * o.to(cdt) for wi, o in zip(w, outs)) / safe[..., None]
    lse = torch.where(alive, torch.log(safe) + top, torch.full_like(total, float("-inf")))
    if sink_logits is not None:
        out, lse = add_sink(out, lse, check_sink_logits(sink_logits, out.shape[1], out.device))
    return out.to(outs[0].dtype), lse


def add_sink(out: torch.Tensor, lse: torch.Tensor, sink_logits: torch.Tensor):
    """Attention ``(out, lse)`` joined by one sink logit per head: ``(out·exp(lse − lse'), lse')``.

    The sink is an extra key with score ``sink_logits[h]`` for every query of head ``h``
    and a zero value (gpt-oss's ``s_aux``, FlashAttention 4's ``learnable_sink``, vLLM's
    ``sinks``): ``lse' = log(exp(lse) + exp(sink))`` and the output shrinks by the
    probability mass the sink takes. Not the ``Sinks`` pattern, which keeps the first
    tokens as keys. ``out`` (B, H, N, Dv), ``lse`` (B, H, N) in the lse dtype
    (``foveal.inputs.lse_dtype``), ``sink_logits`` (H,). A row with no key keeps a zero
    output and gets ``lse' = sink``; a sink of ``-inf`` changes nothing. Differentiable
    in all three; the rescaling runs in the lse dtype.
    """
    cdt = lse.dtype
    t = sink_logits.to(cdt)[None, :, None].expand_as(lse)
    top = torch.maximum(lse, t)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_keys, w_sink = torch.exp(lse - top), torch.exp(t - top)
    total = w_keys + w_sink
    alive = total > 0
    safe = torch.where(alive, total, torch.ones_like(total))
    new_lse = torch.where(alive, torch.log(safe) + top, torch.full_like(total, float("-inf")))
    return (out.to(cdt) * (w_keys / safe)[..., None]).to(out.dtype), new_lse
