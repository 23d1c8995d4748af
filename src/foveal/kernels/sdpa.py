"""The ``sdpa`` backend: dense-equivalent patterns on PyTorch's fused ``scaled_dot_product_attention``.

``Full`` and ``Causal`` need no mask at all, so PyTorch's fused kernel (FlashAttention
on CPU, with its log-sum-exp) computes them exactly and as fast as SDPA itself.
``Causal`` with fewer queries than keys is aligned bottom-right (FlashAttention's
convention; SDPA's ``is_causal`` is top-left): it runs as a ``Full`` call over the
keys every query sees plus an ``is_causal`` call over the square that remains,
merged by their log-sum-exps — still no mask. On CPU the kernel is
``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the lse and
handles GQA natively (its lse gets a gradient here: ``_FlashCPU``); there small
patterns (``SMALL_PAIRS``) run under their additive mask too, where one fused call
beats any sparse kernel; elsewhere plain
``scaled_dot_product_attention`` (``enable_gqa``), which returns no lse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from foveal.bias import table_geometry
from foveal.cache import LRU
from foveal.inputs import HALF
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
    """The CPU flash kernel with a gradient for its log-sum-exp and its additive mask too (aten's has neither).

    ``d lse_i / d s_ij = p_ij``, so the lse's share of the gradient is attention
    itself: ``dq_i += scale·dlse_i·Σ_j p_ij k_j`` (a forward with values = keys) and
    ``dk_j += scale·Σ_i p_ij dlse_i q_i`` (the value gradient of a backward whose output
    gradient is ``dlse·q``). Both run only when the lse receives a gradient. A mask that
    requires grad (a learned score term on a small pattern) gets the score gradient
    ``p ∘ (dout·vᵀ − rowsum(dout ∘ out) + dlse)``, computed densely: it only happens
    for patterns of at most ``SMALL_PAIRS`` pairs.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, mask=None):
        fwd, _ = _flash_ops()
        out, lse = fwd(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        lse = lse.contiguous()  # aten's is laid out (B, N, H)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.mask = causal, scale, mask
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        fwd, bwd = _flash_ops()
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, mask = ctx.causal, ctx.scale, ctx.mask
        if dout is None:
            dout = torch.zeros_like(out)
        lse_safe = lse.masked_fill(lse == float("-inf"), 0.0)
        dq, dk, dv = bwd(dout.contiguous(), q, k, v, out, lse_safe, 0.0, causal, attn_mask=mask, scale=scale)
        if dlse is not None and bool(dlse.any()):
            g = dlse.to(q.dtype)[..., None]
            pk, _ = fwd(q, k, k, 0.0, causal, attn_mask=mask, scale=scale)
            dq = dq + scale * g * pk
            _, _, dk_lse = bwd((scale * g * q).contiguous(), q, k, k, pk, lse_safe, 0.0, causal, attn_mask=mask,
                               scale=scale)
            dk = dk + dk_lse
        dmask = None
        if ctx.needs_input_grad[5]:
            dmask = _score_grad(q, k, v, out, lse_safe, dout, dlse, scale, mask)
        return dq, dk, dv, None, None, dmask


def _score_grad(q, k, v, out, lse, dout, dlse, scale, mask):
    """The gradient of the loss in the additive mask, reduced to the mask's shape: ``p ∘ (dp − delta + dlse)``."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    g = h // hk
    qg = q.reshape(b, hk, g, n, d)  # q and dout may be views with any strides
    s = torch.matmul(qg, k[:, :, None].transpose(-1, -2)).view(b, h, n, -1) * scale
    p = torch.exp(s + mask - lse[..., None])
    dp = torch.matmul(dout.reshape(b, hk, g, n, d), v[:, :, None].transpose(-1, -2)).view(b, h, n, -1)
    delta = (dout * out).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse[..., None].to(delta.dtype)
    ds = p * (dp - delta)
    dims = [i for i in range(4) if mask.shape[i] == 1 and ds.shape[i] != 1]
    return (ds.sum(dims, keepdim=True) if dims else ds).to(mask.dtype)


def _fused(q, k, v, causal: bool, scale: float, need_lse: bool, mask=None):
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask)):
            return _FlashCPU.apply(q, k, v, causal, scale, mask)
        fwd, _ = _flash_ops()
        out, lse = fwd(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        return out, lse.contiguous()  # aten's is laid out (B, N, H)
    if need_lse:
        raise ValueError("sdpa returns no log-sum-exp on this device")
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out, None


def _packed(q, k, v, causal, scale, need_lse, mask=None):
    """``_fused`` for a call where every query sees the same keys (``Full``; a mask only over keys): the query
    heads of one key head become rows of one call, so each key head is read once, not once per query head.

    ``q`` (B, Hq, m, D) becomes (B, Hkv, G·m, D), G = Hq / Hkv (query head h is in group h // G), as
    transformers' ``pack_gqa`` does for decoding; one decode query over 1k–4k keys runs in about half the
    time of ``enable_gqa`` (measured, one thread). Exact: it is the same attention, rows regrouped.
    """
    b, hq, m, d = q.shape
    hkv = k.shape[1]
    if hq == hkv:
        return _fused(q, k, v, causal, scale, need_lse, mask)
    g = hq // hkv
    out, lse = _fused(q.reshape(b, hkv, g * m, d), k, v, causal, scale, need_lse, mask)
    out = out.reshape(b, hq, m, out.shape[-1])
    return out, (None if lse is None else lse.reshape(b, hq, m))


#: static patterns with at most this many (query, key) pairs run on CPU as SDPA under their
#: additive mask (cached by value: 512 KiB at most in float32). Measured on the 2-core
#: CPU (one thread, load average ~4.5: read the ratios), batch 2, 4 heads, head_dim 32,
#: NA 7x7 forward, masked SDPA time / cpu gather kernel time: 8² 0.26, 12² 0.19, 14²
#: 0.32, 16² 0.61, 20² (160k pairs) 0.16, 24² (332k pairs) 1.07, 32² 1.67. So up to
#: 2**17 pairs (about 360 tokens of self-attention) one fused call wins.
SMALL_PAIRS = 1 << 17

MASKS = LRU("sdpa small-pattern masks", maxsize=64)


def small_mask(pattern, dtype, device):
    """``(additive mask (n_q, n_kv) in dtype, rows with an allowed key (n_q,))`` of a small static pattern."""
    def build():
        allowed = pattern.dense_mask(device=device)
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(allowed, zero, float("-inf")), allowed.any(-1)

    return MASKS.get((pattern, dtype, str(device)), build, pattern.cacheable)


#: flat table indices of table-read score terms on small patterns, by (pattern, geometry, device)
TERM_INDEX = LRU("sdpa small-pattern term indices", maxsize=64)


def score_term(bias, heads: int, pattern, dtype, device):
    """The score term evaluated on every (head, query, key) of a small pattern: (1, H, n_q, n_kv), differentiable.

    A term read from a table (``table_index``/``gather``, e.g. ``RelativePositionBias``) is one gather through
    an index cached per pattern and geometry.
    """
    qi = torch.arange(pattern.n_q, device=device)[:, None]
    ki = torch.arange(pattern.n_kv, device=device)[None, :]
    geometry = table_geometry(bias)
    if geometry is not None:
        index = TERM_INDEX.get((pattern, geometry, str(device)),
                               lambda: torch.broadcast_to(bias.table_index(qi, ki), (pattern.n_q, pattern.n_kv))
                               .contiguous(), pattern.cacheable)
        term = bias.gather(index)
    else:
        term = bias(torch.arange(heads, device=device)[:, None, None], qi[None], ki[None])
    return torch.broadcast_to(term, (heads, pattern.n_q, pattern.n_kv)).to(dtype)[None]


def _padded(q, k, v, causal: bool, scale: float, need_lse: bool, pad, mask=None, alive=None):
    """One fused call with the key padding ``pad`` (B, n_kv) added to the additive ``mask``; ``(out, lse)``.

    The fused kernel gives rows with no allowed key a zero output but ``lse = 0``: their
    lse is set to ``-inf`` here. ``alive`` (broadcastable to (B, H, n_q)) says which rows
    have an allowed key under ``mask`` alone (None: all).
    """
    fused = _packed if not causal and mask is None else _fused  # every query sees the same keys: pack GQA
    if pad is None:
        out, lse = fused(q, k, v, causal, scale, need_lse or mask is not None, mask)
        return out, (lse if alive is None or lse is None else torch.where(alive, lse, float("-inf")))
    add = torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill_(pad, float("-inf"))[:, None, None, :]
    out, lse = fused(q, k, v, causal, scale, True, add if mask is None else mask + add)
    keep = ~pad
    if mask is not None:  # small patterns: rows whose allowed keys are all padded
        allowed = torch.isfinite(mask.detach())
        allowed = allowed.view((1,) * (4 - allowed.dim()) + allowed.shape)  # (1, H or 1, n_q, n_kv)
        rows = (allowed & keep[:, None, None, :]).any(-1)
    elif causal:  # row i sees keys 0..i: alive from the first key that is not padding
        first = torch.where(keep.any(-1), keep.int().argmax(-1), keep.shape[-1])
        rows = (torch.arange(q.shape[2], device=q.device)[None, :] >= first[:, None])[:, None, :]
    else:
        rows = keep.any(-1)[:, None, None]
    return out, torch.where(rows, lse, float("-inf"))


def is_small(pattern, device) -> bool:
    """Whether ``pattern`` runs here under its additive mask: CPU, at most ``SMALL_PAIRS`` pairs."""
    return torch.device(device).type == "cpu" and pattern.n_q * pattern.n_kv <= SMALL_PAIRS


def sdpa_attention(q, k, v, pattern, scale: float, *, need_lse: bool = True, key_padding_mask=None, bias=None):
    """Exact attention by the fused kernel; returns ``(out, lse)``.

    ``Full`` or (bottom-right) ``Causal`` without a mask; on CPU, any static pattern with
    at most ``SMALL_PAIRS`` pairs under its additive mask, to which a score term
    ``bias(h, i, j)`` is added (differentiable). ``key_padding_mask`` (B, n_kv) bool,
    True = ignore, joins the mask as ``-inf`` (CPU). Rows with no allowed key: zero
    output, ``lse = -inf``. On CPU, bfloat16 and float16 inputs run in float32 (aten's
    half kernel rounds its probabilities and approximates ``exp``: lse errors 100x
    float32's), the output is rounded back.
    """
    if q.device.type == "cpu" and q.dtype in HALF:
        out, lse = sdpa_attention(q.float(), k.float(), v.float(), pattern, scale, need_lse=need_lse,
                                  key_padding_mask=key_padding_mask, bias=bias)
        return out.to(q.dtype), lse
    pad = key_padding_mask
    kind = dense_kind(pattern)
    if kind is None or bias is not None:
        if not is_small(pattern, q.device):
            raise ValueError(f"sdpa runs Full, Causal (n_q <= n_kv) and, on CPU, patterns of at most {SMALL_PAIRS} "
                             f"pairs (with or without a score term), got {pattern!r}")
        mask, alive = small_mask(pattern, q.dtype, q.device)
        if bias is not None:
            mask = mask + score_term(bias, q.shape[1], pattern, q.dtype, q.device)
        return _padded(q, k, v, False, scale, True, pad, mask, alive)
    if kind == "full":
        return _padded(q, k, v, False, scale, need_lse, pad)
    offset = pattern.n_kv - pattern.n_q
    if offset == 0:
        return _padded(q, k, v, True, scale, need_lse, pad)
    # bottom-right: keys [0, offset) are seen by every query; the rest is a top-left causal square
    seen = _padded(q, k[:, :, :offset], v[:, :, :offset], False, scale, True, None if pad is None else pad[:, :offset])
    square = _padded(q, k[:, :, offset:], v[:, :, offset:], True, scale, True, None if pad is None else pad[:, offset:])
    return merge_attentions([seen[0], square[0]], [seen[1], square[1]])
