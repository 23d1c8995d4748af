"""The ``flex`` backend: compiled FlexAttention driven by the pattern's analytic layout.

The ``BlockMask`` comes from ``pattern.layout(block, block).to_flex(pattern.mask_mod)``
(never ``create_block_mask``'s N² sweep) and is cached by the pattern's value, block size and
device (bounded); the compiled ``flex_attention`` is one object for the process, and
``torch.compile`` caches a kernel per shape, so only the first call of a shape pays
the compile. On CPU, compiled FlexAttention (torch 2.13) runs inference only, without
log-sum-exp and without float64; the backend says so rather than failing inside
Inductor.
"""

from __future__ import annotations

import warnings

import torch

from foveal.cache import LRU
from foveal.inputs import HALF

__all__ = ["flex_block_mask_run", "block_mask_for", "cpu_limits"]

_COMPILED = None
#: FlexAttention's tile; the layout uses the same blocks
BLOCK = 128


#: kernels torch.compile may keep per frame: one per (shape, dtype, pattern) is the point
#: of this backend, and dynamo's default of 8 would silently fall back to eager
#: FlexAttention (which materialises every score) after the eighth shape
RECOMPILE_LIMIT = 64


def raise_recompile_limit():
    """Let torch.compile keep a FlexAttention kernel for each of up to ``RECOMPILE_LIMIT`` shapes."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)


def _compiled():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        raise_recompile_limit()
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


#: BlockMasks by pattern value, block size and device
BLOCK_MASKS = LRU("flex block masks", maxsize=64)


def block_mask_for(pattern, device, block: int = BLOCK):
    """The pattern's ``BlockMask`` on ``device`` (cached by the pattern's value, bounded)."""
    device = torch.device(device)
    return BLOCK_MASKS.get(
        (pattern, block, str(device)), lambda: pattern.layout(block, block).to_flex(pattern.mask_mod, device=device),
        pattern.cacheable,
    )


def cpu_limits(dtype, needs_grad: bool, need_lse: bool) -> list[str]:
    """What compiled FlexAttention cannot do on CPU for this call."""
    reasons = []
    if needs_grad:
        reasons.append("compiled FlexAttention on CPU supports inference only (no backward)")
    if need_lse:
        reasons.append("compiled FlexAttention on CPU cannot return the log-sum-exp")
    if dtype == torch.float64:
        reasons.append("compiled FlexAttention on CPU does not support float64")
    return reasons


def _score_mod(bias, padding, softcap):
    """One ``score_mod`` for the cap, the additive term and the key padding (in that order), or None."""
    if bias is None and padding is None and softcap is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if bias is not None:
            score = score + bias(h, q_idx, kv_idx)
        if padding is not None:
            score = torch.where(padding[b, kv_idx], float("-inf"), score)
        return score

    return score_mod


def flex_block_mask_run(q, k, v, bm, scale: float, *, need_lse: bool, bias=None, key_padding_mask=None,
                        softcap=None):
    """Run compiled FlexAttention under the ``BlockMask`` ``bm``; returns ``(out, lse or None)``.

    The cap, the score term and the key padding go into one ``score_mod`` (padding as
    ``-inf`` scores, so that full blocks see it too). On CPU, bfloat16 and float16 inputs
    run in float32 (the compiled CPU kernel rounds its probabilities to the inputs'
    dtype), the output is rounded back.
    """
    if q.device.type == "cpu" and q.dtype in HALF:
        out, lse = flex_block_mask_run(q.float(), k.float(), v.float(), bm, scale, need_lse=need_lse, bias=bias,
                                       key_padding_mask=key_padding_mask, softcap=softcap)
        return out.to(q.dtype), lse
    from torch.nn.attention.flex_attention import AuxRequest

    gqa = q.shape[1] != k.shape[1]
    fn = _compiled()
    kwargs = dict(block_mask=bm, scale=scale, enable_gqa=gqa)
    score_mod = _score_mod(bias, key_padding_mask, softcap)
    if score_mod is not None:
        kwargs["score_mod"] = score_mod
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if need_lse or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
            out, aux = fn(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
            return out, aux.lse
        return fn(q, k, v, **kwargs), None
