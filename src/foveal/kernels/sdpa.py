"""The ``sdpa`` backend: dense-equivalent patterns on PyTorch's fused ``scaled_dot_product_attention``.

``Full`` and ``Causal`` need no mask at all, so PyTorch's fused kernel (FlashAttention
on CPU, with its log-sum-exp) computes them exactly and as fast as SDPA itself.
``Causal`` with fewer queries than keys is aligned bottom-right (FlashAttention's
convention; SDPA's ``is_causal`` is top-left): it runs as a ``Full`` call over the
keys every query sees plus an ``is_causal`` call over the square that remains,
merged by their log-sum-exps — still no mask. On CPU the kernel is
``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the lse and
handles GQA natively (its lse gets a gradient here: ``_FlashCPU``); elsewhere plain
``scaled_dot_product_attention`` (``enable_gqa``), which returns no lse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from foveal.merge import merge_attentions
from foveal.patterns.global_ import Causal, Full

__all__ = ["sdpa_attention", "dense_kind"]


def dense_kind(pattern) -> str | None:
    """``"full"`` or ``"causal"`` when the pattern is one SDPA computes without a mask, else None."""
    if isinstance(pattern, Full) or (isinstance(pattern, Causal) and pattern.n_q == 1):
        return "full"  # one bottom-right causal query sees every key
    if isinstance(pattern, Causal) and pattern.n_q <= pattern.n_kv:
        return "causal"
    return None


_FLASH = None


def _flash_ops():
    global _FLASH
    if _FLASH is None:
        aten = torch.ops.aten
        _FLASH = (aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward)
    return _FLASH


class _FlashCPU(torch.autograd.Function):
    """The CPU flash kernel with a gradient for its log-sum-exp too (aten's treats lse as a constant).

    ``d lse_i / d s_ij = p_ij``, so the lse's share of the gradient is attention
    itself: ``dq_i += scale·dlse_i·Σ_j p_ij k_j`` (a forward with values = keys) and
    ``dk_j += scale·Σ_i p_ij dlse_i q_i`` (the value gradient of a backward whose output
    gradient is ``dlse·q``). Both run only when the lse receives a gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        fwd, _ = _flash_ops()
        out, lse = fwd(q, k, v, 0.0, causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        fwd, bwd = _flash_ops()
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale = ctx.causal, ctx.scale
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = bwd(dout.contiguous(), q, k, v, out, lse, 0.0, causal, scale=scale)
        if dlse is not None and bool(dlse.any()):
            g = dlse.to(q.dtype)[..., None]
            pk, _ = fwd(q, k, k, 0.0, causal, scale=scale)
            dq = dq + scale * g * pk
            _, _, dk_lse = bwd((scale * g * q).contiguous(), q, k, k, pk, lse, 0.0, causal, scale=scale)
            dk = dk + dk_lse
        return dq, dk, dv, None, None


def _fused(q, k, v, causal: bool, scale: float, need_lse: bool):
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return _FlashCPU.apply(q, k, v, causal, scale)
        fwd, _ = _flash_ops()
        return fwd(q, k, v, 0.0, causal, scale=scale)
    if need_lse:
        raise ValueError("sdpa returns no log-sum-exp on this device")
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out, None


def sdpa_attention(q, k, v, pattern, scale: float, need_lse: bool = True):
    """Exact attention for ``Full`` or (bottom-right) ``Causal`` by the fused kernel; returns ``(out, lse)``."""
    kind = dense_kind(pattern)
    if kind is None:
        raise ValueError(f"sdpa runs Full and Causal (n_q <= n_kv) only, got {pattern!r}")
    if kind == "full":
        return _fused(q, k, v, False, scale, need_lse)
    offset = pattern.n_kv - pattern.n_q
    if offset == 0:
        return _fused(q, k, v, True, scale, need_lse)
    # bottom-right: keys [0, offset) are seen by every query; the rest is a top-left causal square
    seen = _fused(q, k[:, :, :offset], v[:, :, :offset], False, scale, True)
    square = _fused(q, k[:, :, offset:], v[:, :, offset:], True, scale, True)
    return merge_attentions([seen[0], square[0]], [seen[1], square[1]])
