"""One validator for attention inputs, shared by ``attend``, the kernels, decoding and context parallelism.

Every check runs before any work and raises with a message that names the argument,
the value given and what is allowed. The exception policy is one rule:

* ``TypeError``: the argument is of the wrong *kind* — not a tensor, not callable, a
  dtype that is not a floating type, tensors of different dtypes, a bool where a
  number is wanted.
* ``ValueError``: the kind is right but the *value* is not allowed — a shape, a head
  count, a device, a number out of range, a combination a backend cannot run.

The log-sum-exp rule: ``lse`` is float64 for float64 inputs and float32 otherwise
(``lse_dtype``); every merge of partial results runs in that dtype. The accumulation
rule: inputs in a ``HALF`` dtype are computed in float32 — scores, score terms, softmax,
lse and every sum of a gradient (a score term's table included) — and only the
returned output and gradients are rounded to the inputs' dtype.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "DTYPES",
    "HALF",
    "lse_dtype",
    "check_tensor",
    "check_qkv",
    "check_scale",
    "check_softcap",
    "check_key_padding_mask",
    "check_bias",
    "check_sink_logits",
    "check_tokens",
]

#: the dtypes attention inputs may have
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the dtypes computed in float32 (the accumulation rule)
HALF = (torch.float16, torch.bfloat16)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the log-sum-exp (and of every merge) for inputs of ``dtype``: float64 or float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, t, layout: str = "(batch, heads, tokens, head_dim)", ndim: int = 4) -> torch.Tensor:
    """A floating tensor of ``ndim`` dimensions (``TypeError`` for the kind, ``ValueError`` for the shape)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must have one of the dtypes {[str(d) for d in DTYPES]}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    return t


def check_qkv(q, k, v, layout: str = "(batch, heads, tokens, head_dim)") -> None:
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): one dtype, one device, GQA heads.

    Batch 0 is allowed (as in ``scaled_dot_product_attention``); zero heads or a zero
    head_dim are refused (token counts are checked against the pattern: ``check_tokens``).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, layout)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, hq, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must agree in (batch, heads, tokens), got {tuple(k.shape[:3])} and {tuple(v.shape[:3])}"
        )
    hkv = k.shape[1]
    if hq == 0 or hkv == 0:
        raise ValueError(f"q and k need at least one head, got {hq} query and {hkv} key/value heads")
    if d == 0 or v.shape[-1] == 0:
        raise ValueError(f"head_dim must be >= 1, got {d} for q and {v.shape[-1]} for v")
    if k.shape[-1] != d:
        raise ValueError(f"q and k must share head_dim, got {d} and {k.shape[-1]}")
    if hq % hkv:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (GQA), got {hq} query and {hkv} key/value heads"
        )


def check_tokens(q, k, n_q: int, n_kv: int, what) -> None:
    """The token counts of q and k/v equal the ``n_q`` queries and ``n_kv`` keys of ``what`` (a pattern)."""
    if q.shape[2] != n_q:
        raise ValueError(f"q has {q.shape[2]} tokens but the pattern {what!r} has {n_q} queries")
    if k.shape[2] != n_kv:
        raise ValueError(f"k and v have {k.shape[2]} tokens but the pattern {what!r} has {n_kv} keys")


def check_scale(scale, head_dim: int) -> float:
    """``scale`` as a float: ``1/sqrt(head_dim)`` for None, else a positive finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a number or None, got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def check_softcap(softcap) -> float | None:
    """``softcap`` as a float (a positive finite number) or None (no cap)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a number or None, got {softcap!r} ({type(softcap).__name__})")
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be a positive finite number or None (no cap), got {softcap!r}")
    return float(softcap)


def check_key_padding_mask(mask, batch: int, n_kv: int, device) -> torch.Tensor | None:
    """``key_padding_mask`` (B, n_kv) bool on the inputs' device, True = ignore that key; or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be None or a bool tensor (batch, n_kv), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = ignore that key), got {mask.dtype}")
    if tuple(mask.shape) != (batch, n_kv):
        raise ValueError(f"key_padding_mask must have shape (batch, n_kv) = ({batch}, {n_kv}), got {tuple(mask.shape)}")
    if mask.device != torch.device(device):
        raise ValueError(f"key_padding_mask must be on the inputs' device {device}, got {mask.device}")
    return mask


def check_sink_logits(sink_logits, heads: int, device) -> torch.Tensor | None:
    """``sink_logits`` as a floating (Hq,) tensor on the inputs' device (one logit per query head); or None.

    Values are not read here (no device sync, traceable): ``+inf`` or NaN give NaN
    rows, as they would in the models that learn them.
    """
    if sink_logits is None:
        return None
    if not isinstance(sink_logits, torch.Tensor):
        raise TypeError(f"sink_logits must be None or a float tensor (query_heads,), got {type(sink_logits).__name__}")
    if not sink_logits.is_floating_point():
        raise TypeError(f"sink_logits must be a floating tensor, got {sink_logits.dtype}")
    if tuple(sink_logits.shape) != (heads,):
        raise ValueError(
            f"sink_logits must have shape (query_heads,) = ({heads},), one logit per query head, "
            f"got {tuple(sink_logits.shape)}"
        )
    if sink_logits.device != torch.device(device):
        raise ValueError(f"sink_logits must be on the inputs' device {device}, got {sink_logits.device}")
    return sink_logits


def check_bias(bias, heads: int, device):
    """A score term ``bias(h, q_idx, kv_idx)`` that gives a float tensor broadcastable per head; or None.

    It is probed on one (query, key) pair of every head before any work: a term for
    another number of heads (``num_heads`` attribute, or a result whose head axis is
    neither 1 nor ``heads``), one whose result does not broadcast to the (heads, 1, 1)
    it was asked for (a constant of another shape), or one that returns something else
    than a floating tensor is refused here rather than inside a kernel.
    """
    if bias is None:
        return None
    if not callable(bias):
        raise TypeError(f"bias must be None or a callable bias(h, q_idx, kv_idx) -> tensor, got {type(bias).__name__}")
    own = getattr(bias, "num_heads", None)
    if isinstance(own, numbers.Integral) and not isinstance(own, bool) and own != heads:
        raise ValueError(f"bias {bias!r} is for {own} heads but q has {heads} query heads")
    h = torch.arange(heads, device=device)[:, None, None]
    zero = torch.zeros(1, 1, 1, dtype=torch.int64, device=device)
    with torch.no_grad():
        try:
            probe = bias(h, zero, zero)
        except IndexError as e:  # a table with fewer heads than asked for
            raise ValueError(f"bias {bias!r} cannot be evaluated for {heads} query heads: {e}") from e
    if not isinstance(probe, torch.Tensor) or not probe.is_floating_point():
        got = probe.dtype if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise TypeError(f"bias must return a floating tensor, got {got}")
    asked = (heads, 1, 1)  # the pair shape the probe asks for: every head, one query, one key
    try:
        fits = probe.dim() <= 3 and torch.broadcast_shapes(probe.shape, asked) == asked
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"bias(h, q_idx, kv_idx) with h of shape {asked} and one (query, key) pair returned shape "
            f"{tuple(probe.shape)}: a term must broadcast to (heads, queries, keys), the shape it was asked for, "
            f"here expected {asked}"
        )
    return bias
