"""``attend``: attention of q over k/v restricted to a pattern, on a chosen backend."""

from __future__ import annotations

import math
import numbers

import torch

from foveal.kernels.select import Call, select
from foveal.patterns.base import Pattern
from foveal.patterns.dynamic import BlockSelection, DynamicPattern
from foveal.patterns.local import Grid
from foveal.patterns.order import Ordered

__all__ = ["attend", "na_av"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(q, k, v, pattern, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be one of {[str(d) for d in _DTYPES]}, got {t.dtype}")
    if not isinstance(pattern, (Pattern, DynamicPattern, BlockSelection)):
        raise TypeError(
            f"pattern must be a foveal Pattern, got {type(pattern).__name__} "
            "(a dynamic pattern or a BlockSelection is accepted too)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, hq, nq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must agree in (batch, heads, tokens), got {tuple(k.shape[:3])} and {tuple(v.shape[:3])}"
        )
    if k.shape[-1] != d:
        raise ValueError(f"q and k must share head_dim, got {d} and {k.shape[-1]}")
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (GQA), got {hq} query and {hkv} key/value heads"
        )
    if nq != pattern.n_q:
        raise ValueError(f"q has {nq} tokens but the pattern {pattern!r} has {pattern.n_q} queries")
    if k.shape[2] != pattern.n_kv:
        raise ValueError(f"k and v have {k.shape[2]} tokens but the pattern {pattern!r} has {pattern.n_kv} keys")
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def attend(q, k, v, pattern, *, bias=None, scale=None, backend: str = "auto", return_lse: bool = False):
    """Softmax attention of each query over the keys ``pattern`` allows.

    ``q`` is (B, Hq, Nq, D), ``k`` (B, Hkv, Nk, D), ``v`` (B, Hkv, Nk, Dv), as in
    ``scaled_dot_product_attention``; ``Hq`` a multiple of ``Hkv`` (GQA/MQA: query head
    ``h`` uses key head ``h // (Hq // Hkv)``); tokens are in the row-major order of the
    pattern's grid. Returns ``out`` (B, Hq, Nq, Dv), and with ``return_lse`` also the
    float32 log-sum-exp of the allowed scaled scores (B, Hq, Nq). ``scale`` defaults to
    ``1/sqrt(D)``. A query with no allowed key gets a zero output and ``lse = -inf``.
    ``backend`` is ``"auto"`` or a name from ``foveal.kernels.select.BACKENDS``.
    ``bias`` is an additive score term ``bias(h, q_idx, kv_idx)`` (``foveal.bias``:
    ``ALiBi``, ``RelativePositionBias``, or any such function), added to the scaled
    scores; gradients reach the tensors its ``parameters()`` returns.
    ``pattern`` may also be a content-selected pattern (``foveal.patterns.dynamic``:
    its blocks are selected from q and k without gradients, then attended with
    gradients to q, k, v) or a ``BlockSelection`` made beforehand with
    ``pattern.select(q, k)``, whose statistics (``density()``, ``blocks_kept()``) the
    caller keeps; these run on the ``blocksparse`` kernel (``reference``: the
    selection's dense mask; ``flex``: FlexAttention with per-(batch, head) block tables)
    and take no ``bias``.
    """
    scale = _check_inputs(q, k, v, pattern, scale)
    if bias is not None and not callable(bias):
        raise TypeError(f"bias must be None or a callable bias(h, q_idx, kv_idx) -> tensor, got {type(bias).__name__}")
    if isinstance(pattern, (DynamicPattern, BlockSelection)):
        return _attend_selected(q, k, v, pattern, bias, scale, backend, return_lse)
    if isinstance(pattern, Grid) and backend != "reference":
        pattern = pattern.as_ordered()  # contiguous groups: the same mask, far denser blocks
    if isinstance(pattern, Ordered) and backend != "reference":
        # tokens into the pattern's order, the inner pattern there, and back (the reference keeps the dense mask)
        res = attend(
            *(pattern.to_order(t) for t in (q, k, v)), pattern.inner, scale=scale, backend=backend,
            bias=None if bias is None else pattern.ordered_bias(bias), return_lse=return_lse,
        )
        if not return_lse:
            return pattern.from_order(res)
        return pattern.from_order(res[0]), pattern.from_order(res[1], dim=-1)
    call = Call(q, k, v, pattern, scale, need_lse=return_lse, bias=bias)
    out, lse = select(call, backend).run(call)
    return (out, lse) if return_lse else out


def _attend_selected(q, k, v, pattern, bias, scale, backend, return_lse):
    """``attend`` over a dynamic pattern or a selection: select under no_grad, then the chosen kernel
    (``blocksparse`` for ``auto``; ``reference``; ``flex``)."""
    from foveal.kernels.blocksparse import blocksparse_attention

    if bias is not None:
        raise ValueError(f"bias is not supported with dynamic patterns or selections, got {type(bias).__name__}")
    if backend not in ("auto", "blocksparse", "reference", "flex"):
        raise ValueError(
            f"backend must be 'auto', 'blocksparse', 'reference' or 'flex' for {type(pattern).__name__}, got {backend!r}"
        )
    if backend == "flex" and q.device.type == "cpu":
        from foveal.kernels.flex import cpu_limits

        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        reasons = cpu_limits(q.dtype, needs_grad, return_lse)
        if reasons:
            raise ValueError(f"backend 'flex' cannot run this call: {'; '.join(reasons)}")
    sel = pattern.select(q, k, scale) if isinstance(pattern, DynamicPattern) else pattern
    if sel.kv_blocks.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"the selection is for (batch, heads) {tuple(sel.kv_blocks.shape[:2])} but q has {tuple(q.shape[:2])}"
        )
    if backend == "flex":  # per-(batch, head) block tables and a pointwise mask_mod
        from foveal.kernels.blocksparse import selection_block_mask
        from foveal.kernels.flex import flex_block_mask_run

        if sel.kv_tokens is not None and sel.kv_tokens.shape[-1] and not sel.tokens_in_mask_fn:
            raise ValueError("backend 'flex' cannot run a selection whose single key tokens its mask_fn does not imply")

        out, lse = flex_block_mask_run(q, k, v, selection_block_mask(sel, q.device), scale, return_lse)
        return (out, lse) if return_lse else out
    if backend == "reference":  # the selection's exact (B, H, n, n) mask, dense: the oracle
        from foveal.kernels.reference import reference_attention

        out, lse = reference_attention(q, k, v, sel.dense_mask().to(q.device), scale)
        return (out, lse) if return_lse else out
    out, lse = blocksparse_attention(
        q, k, v, sel.kv_blocks, sel.block, scale, partial=sel.partial, mask_fn=sel.mask_fn, kv_tokens=sel.kv_tokens
    )
    return (out, lse) if return_lse else out


from foveal.functional_na import na_av  # noqa: E402  (re-exported: NATTEN's weights × values op)
