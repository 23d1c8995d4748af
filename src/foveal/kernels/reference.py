"""The reference backend: exact dense masked attention, the oracle for every other backend.

It materialises the full ``(n_q, n_kv)`` mask and score matrix, so it costs O(N²)
time and memory; use it for tests and small inputs only. It computes in float32
(float64 for float64 inputs) and is differentiated by autograd.
"""

from __future__ import annotations

import torch

from foveal.inputs import lse_dtype

__all__ = ["reference_attention"]


def reference_attention(q, k, v, mask: torch.Tensor, scale: float, *, bias: torch.Tensor | None = None,
                        softcap: float | None = None):
    """Softmax attention of ``q`` over ``k``/``v`` restricted to ``mask``; returns ``(out, lse)``.

    Shapes: ``q`` (B, Hq, Nq, D), ``k`` (B, Hkv, Nk, D), ``v`` (B, Hkv, Nk, Dv) with
    ``Hq % Hkv == 0`` (query head ``h`` uses key head ``h // (Hq // Hkv)``), ``mask``
    (Nq, Nk) bool, or broadcastable to (B, Hq, Nq, Nk) (per-head, per-selection or
    key-padding masks). ``out`` is (B, Hq, Nq, Dv) in ``q``'s dtype; ``lse`` (B, Hq, Nq)
    float32 (float64 for float64 inputs) is the log-sum-exp of the allowed scaled
    scores. A query with no allowed key gets a zero output and ``lse = -inf``, and
    zero gradients. ``softcap`` caps the scaled scores, ``softcap·tanh(s / softcap)``
    (FlashAttention, Gemma 2); ``bias``, if given, is added after the cap
    (broadcastable to (B, Hq, Nq, Nk)), then the mask.
    """
    compute = lse_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    kf = k.to(compute).repeat_interleave(groups, dim=1)
    vf = v.to(compute).repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.to(compute), kf.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(compute)
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    alive = denom > 0
    safe = torch.where(alive, denom, torch.ones_like(denom))
    out = torch.matmul(p, vf) / safe
    lse = torch.where(alive, torch.log(safe) + row_max, torch.full_like(denom, float("-inf")))
    return out.to(q.dtype), lse.squeeze(-1)
