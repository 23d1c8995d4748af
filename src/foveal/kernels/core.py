"""The FlashAttention-style core shared by the gather (``cpu``) and ``blocksparse`` kernels.

A kernel cuts the work into *tiles*: a batch of query rows, each with its own
gathered keys. For one tile the core takes the scaled scores ``s = scale·q·kᵀ``
(computed by the kernel, which knows where the keys live), applies the logit cap
and the additive terms (mask as ``-inf``, score bias, key padding), and then

* forward: a numerically safe softmax that writes the output and the log-sum-exp;
* backward: recomputes the probabilities from the scores (``p = exp(s − lse)``, as
  FlashAttention does, here as the fused softmax of the same scores) and returns
  ``p`` and the score gradient ``ds = p ∘ (dO·vᵀ − δ)``, through the cap.

Order of operations (FlashAttention's and Gemma 2's): ``softcap·tanh(s / softcap)``
first, then the additive terms. A row with no allowed key gets a zero output,
``lse = -inf`` and zero gradients. Everything runs in the compute dtype
(float64 for float64 inputs, float32 otherwise).
"""

from __future__ import annotations

import torch

from foveal.inputs import lse_dtype as compute_dtype

__all__ = ["compute_dtype", "cap", "softmax_tile", "backward_tile", "delta_rows"]

_NEG_INF = float("-inf")


def cap(s: torch.Tensor, softcap: float | None, need_grad: bool = False):
    """``s ← softcap·tanh(s / softcap)`` in place; returns ``1 − tanh²`` (the cap's derivative) when asked."""
    if softcap is None:
        return None
    t = s.div_(softcap).tanh_()
    deriv = (1.0 - t * t) if need_grad else None
    t.mul_(softcap)
    return deriv


def softmax_tile(s: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None, need_lse: bool = True):
    """Softmax of the final scores ``s`` (r, rows, keys) times ``v`` (r, keys, Dv).

    Returns ``(o, lse)``: ``o`` (r, rows, Dv), written into ``out`` when it is one
    contiguous block of that shape, and ``lse`` (r, rows) — or ``None`` without
    ``need_lse``, in which case rows with no allowed key are NaN (the caller zeroes
    them). The probabilities come from ``torch.softmax``, and ``lse = max − log(max p)``
    (the largest probability is ``1 / Σ exp(s − max)``): on CPU ``exp`` of the many
    ``-inf`` entries of a masked tile is several times slower than the fused softmax.
    """
    p = torch.softmax(s, -1)
    if not need_lse:
        return _bmm(p, v, out), None
    m = s.amax(-1, keepdim=True)
    dead = m == _NEG_INF
    if bool(dead.any()):
        p.masked_fill_(dead, 0.0)
    o = _bmm(p, v, out)
    lse = (m - p.amax(-1, keepdim=True).log()).masked_fill_(dead, _NEG_INF).squeeze(-1)
    return o, lse


def backward_tile(s: torch.Tensor, do: torch.Tensor, v: torch.Tensor, delta: torch.Tensor,
                  deriv: torch.Tensor | None):
    """``(p, ds_final, ds)`` for one tile: probabilities, the gradient of the final scores and of ``scale·q·kᵀ``.

    ``s`` (r, rows, keys) are the recomputed final scores (rows with no allowed key:
    ``p`` is 0), ``do`` (r, rows, Dv) the output gradient, ``v`` (r, keys, Dv),
    ``delta`` (r, rows) ``rowsum(dO ∘ O) − dlse``, ``deriv`` the cap's derivative or
    None. ``p = exp(s − lse)`` is recomputed as the softmax of the same scores (equal,
    and much faster on masked tiles). ``ds_final`` is what an additive score term
    receives; ``ds`` goes on to q and k.
    """
    p = torch.softmax(s, -1)
    dead = s.amax(-1, keepdim=True) == _NEG_INF
    if bool(dead.any()):
        p.masked_fill_(dead, 0.0)
    ds_final = torch.bmm(do, v.transpose(1, 2)).sub_(delta[..., None]).mul_(p)
    ds = ds_final if deriv is None else ds_final * deriv
    return p, ds_final, ds


def delta_rows(do: torch.Tensor, out: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """``rowsum(dO ∘ O) − dlse``: the per-row term of the softmax backward (lse gets a gradient of its own)."""
    delta = (do * out).sum(-1)
    return delta if dlse is None else delta - dlse


def _bmm(a, b, out):
    """``a @ b``, written straight into ``out`` when it is one contiguous block."""
    if out is not None and out.is_contiguous():
        return torch.bmm(a, b, out=out.view(a.shape[0], a.shape[1], b.shape[2]))
    return torch.bmm(a, b)
