"""``attend``: attention of q over k/v restricted to a pattern, on a chosen backend.

One straight line: validate the inputs once (``foveal.inputs``) → lower the pattern
into kernel calls (``foveal.lowering``) → select a backend for each
(``foveal.kernels.select``) → run → put the pieces back together.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from foveal.inputs import (
    check_bias,
    check_key_padding_mask,
    check_qkv,
    check_scale,
    check_sink_logits,
    check_softcap,
    check_tokens,
    lse_dtype,
)
from foveal.custom_op import trace_constant
from foveal.kernels.call import Call
from foveal.kernels.select import check_backend_name, route
from foveal.lowering import assemble
from foveal.merge import add_sink
from foveal.patterns.base import Pattern
from foveal.patterns.dynamic import BlockSelection, DynamicPattern
from foveal.patterns.perhead import PerHead

__all__ = ["attend", "na_av"]

_PATTERNS = (Pattern, DynamicPattern, BlockSelection, PerHead)


def attend(q, k, v, pattern, *, bias=None, scale=None, key_padding_mask=None, softcap=None, sink_logits=None,
           backend: str = "auto", return_lse: bool = False):
    """Softmax attention of each query over the keys ``pattern`` allows.

    ``q`` is (B, Hq, Nq, D), ``k`` (B, Hkv, Nk, D), ``v`` (B, Hkv, Nk, Dv), as in
    ``scaled_dot_product_attention``; ``Hq`` a multiple of ``Hkv`` (GQA/MQA: query head
    ``h`` uses key head ``h // (Hq // Hkv)``); tokens are in the row-major order of the
    pattern's grid. Returns ``out`` (B, Hq, Nq, Dv), and with ``return_lse`` also the
    log-sum-exp of the allowed final scores (B, Hq, Nq): float64 for float64 inputs,
    float32 otherwise. A query with no allowed key gets a zero output and
    ``lse = -inf``. Batch 0 gives empty results. bfloat16 and float16 inputs accumulate in
    float32 on every backend, forward and backward (a score term's table gradient too);
    only the returned tensors are rounded to their dtype.

    The score of query ``i`` and key ``j`` is ``s = scale·q_i·k_j`` (``scale`` defaults
    to ``1/sqrt(D)``), then ``softcap·tanh(s / softcap)`` when ``softcap`` is given
    (FlashAttention's and Gemma 2's logit cap), then ``+ bias(h, i, j)`` when a score
    term is given (``foveal.bias``: ``ALiBi``, ``RelativePositionBias`` or any such
    function; gradients reach the tensors its ``parameters()`` returns); pairs the
    pattern forbids, and keys marked True in ``key_padding_mask`` (B, Nk) bool — the
    ``torch.nn.MultiheadAttention`` convention, True = ignore — get ``-inf``.
    ``sink_logits`` (Hq,), a learned logit per query head, joins every row's softmax as
    one extra key whose value is zero (gpt-oss's ``s_aux``, FlashAttention 4's
    ``learnable_sink``; ``foveal.merge.add_sink``): it takes probability mass and adds to
    the lse, and its gradient reaches the tensor. It is not the ``Sinks`` pattern, which
    keeps the first tokens as keys. A row with no allowed key then gets a zero output
    and ``lse = sink_logits[h]``. The backend computes the row's softmax without it and
    the sink is joined from the output and lse (an exact rescaling, in float32 for half
    inputs).

    ``pattern`` is a static ``Pattern``; a ``PerHead`` (one pattern per query head); a
    content-selected pattern (``foveal.patterns.dynamic``: its blocks are selected from
    q and k without gradients, then attended with gradients to q, k, v); or a
    ``BlockSelection`` made beforehand with ``pattern.select(q, k)``, whose statistics the
    caller keeps. ``backend`` is ``"auto"`` or a name from
    ``foveal.kernels.select.BACKENDS`` (``reference``, ``sdpa``, ``cpu``,
    ``blocksparse``, ``flex``); a backend that cannot run the call says why.
    """
    if torch.compiler.is_compiling() and _built_while_tracing(pattern):
        from foveal.custom_op import attend_outside_graph

        return attend_outside_graph(q, k, v, pattern, bias=bias, scale=scale, key_padding_mask=key_padding_mask,
                                    softcap=softcap, sink_logits=sink_logits, backend=backend, return_lse=return_lse)
    call = _validate(q, k, v, pattern, bias, scale, key_padding_mask, softcap, backend, return_lse)
    sink_logits = check_sink_logits(sink_logits, q.shape[1], q.device)
    if q.shape[0] == 0:
        return _empty(q, k, v, return_lse)
    if torch.compiler.is_compiling():  # one opaque op in the graph (foveal.custom_op): it runs the lines below
        from foveal.custom_op import attend_traced

        return attend_traced(q, k, v, call.pattern, bias=call.bias, scale=call.scale,
                             key_padding_mask=call.key_padding_mask, softcap=call.softcap, sink_logits=sink_logits,
                             backend=backend, return_lse=return_lse)
    if sink_logits is not None:
        call = replace(call, need_lse=True)
    routed = route(call, backend)  # lowered pieces, each with its backend (``why_not`` asks the same)
    results = [runner.run(piece.call) for piece, runner in routed]
    out, lse = assemble([piece for piece, _ in routed], results, q.shape[1])
    if sink_logits is not None:
        out, lse = add_sink(out, lse, sink_logits)
    return (out, lse) if return_lse else out


def _validate(q, k, v, pattern, bias, scale, key_padding_mask, softcap, backend, return_lse) -> Call:
    """Every check of ``attend``, before any work: the ``Call`` to lower."""
    check_qkv(q, k, v)
    n_q, n_kv, parts = _pattern_facts(pattern)
    check_tokens(q, k, n_q, n_kv, pattern)
    if parts is not None and parts != q.shape[1]:
        raise ValueError(f"the PerHead pattern has {parts} parts but q has {q.shape[1]} query heads")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    check_backend_name(backend)
    return Call(
        q, k, v, pattern, check_scale(scale, q.shape[-1]), need_lse=return_lse,
        bias=check_bias(bias, q.shape[1], q.device),
        key_padding_mask=check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2], q.device),
        softcap=check_softcap(softcap),
    )


@trace_constant
def _pattern_facts(pattern) -> tuple[int, int, int | None]:
    """``(n_q, n_kv, PerHead parts or None)`` of a pattern, after checking it is one (a constant under compile)."""
    if not isinstance(pattern, _PATTERNS):
        raise TypeError(
            f"pattern must be a foveal Pattern, got {type(pattern).__name__} "
            "(a PerHead, a content-selected pattern or a BlockSelection is accepted too)"
        )
    return pattern.n_q, pattern.n_kv, pattern.num_heads if isinstance(pattern, PerHead) else None


@trace_constant
def _built_while_tracing(pattern) -> bool:
    """Whether torch.compile hands over a pattern that its traced code is still building (its fields not yet
    set on the object): such a pattern cannot be a constant of the graph, and attend runs outside it."""
    if not isinstance(pattern, _PATTERNS):
        return False
    try:
        pattern.n_q, pattern.n_kv
    except AttributeError:
        return True
    return False


def _empty(q, k, v, return_lse):
    """Batch 0: empty results that still take part in autograd (zero-size gradients)."""
    b, h, n, _ = q.shape
    out = q.new_zeros(b, h, n, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())
    lse = torch.full((b, h, n), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    return (out, lse) if return_lse else out


from foveal.functional_na import na_av  # noqa: E402  (re-exported: NATTEN's weights × values op)
