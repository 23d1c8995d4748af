"""``attend`` without ``torch.compile``'s op: validate once, route, run, assemble, join the sink logits.

``foveal.functional.attend`` is this straight line in eager mode; under ``torch.compile`` it
validates the same way and calls the custom op ``foveal::attend`` (``foveal.custom_op``),
whose implementation is ``attend_eager``. Living below both, this module is what lets
the op call attend's eager path without an import circle.
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
from foveal.kernels.call import Call
from foveal.kernels.select import check_backend_name, route
from foveal.lowering import assemble
from foveal.merge import add_sink
from foveal.patterns.base import Pattern
from foveal.patterns.dynamic import BlockSelection, DynamicPattern
from foveal.patterns.perhead import PerHead
from foveal.tracing import trace_constant

__all__ = ["attend_eager", "validate", "run", "empty", "PATTERNS"]

#: what ``attend`` takes as its pattern
PATTERNS = (Pattern, DynamicPattern, BlockSelection, PerHead)


def attend_eager(q, k, v, pattern, *, bias=None, scale=None, key_padding_mask=None, softcap=None, sink_logits=None,
                 backend: str = "auto", return_lse: bool = False):
    """``foveal.attend`` computed eagerly, whatever the tracing state (the custom op's implementation)."""
    call, sink_logits = validate(q, k, v, pattern, bias, scale, key_padding_mask, softcap, sink_logits, backend,
                                 return_lse)
    if q.shape[0] == 0:
        return empty(q, k, v, return_lse)
    return run(call, sink_logits, backend, return_lse)


def run(call: Call, sink_logits, backend: str, return_lse: bool):
    """A validated call: lowered pieces on their backends, put back together, the sink logits joined."""
    if sink_logits is not None:
        call = replace(call, need_lse=True)
    routed = route(call, backend)  # lowered pieces, each with its backend (``why_not`` asks the same)
    results = [runner.run(piece.call) for piece, runner in routed]
    out, lse = assemble([piece for piece, _ in routed], results, call.q.shape[1])
    if sink_logits is not None:
        out, lse = add_sink(out, lse, sink_logits)
    return (out, lse) if return_lse else out


def validate(q, k, v, pattern, bias, scale, key_padding_mask, softcap, sink_logits, backend, return_lse):
    """Every check of ``attend``, before any work: the ``Call`` to lower and the checked sink logits."""
    call = _validate(q, k, v, pattern, bias, scale, key_padding_mask, softcap, backend, return_lse)
    return call, check_sink_logits(sink_logits, q.shape[1], q.device)


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
    if not isinstance(pattern, PATTERNS):
        raise TypeError(
            f"pattern must be a foveal Pattern, got {type(pattern).__name__} "
            "(a PerHead, a content-selected pattern or a BlockSelection is accepted too)"
        )
    return pattern.n_q, pattern.n_kv, pattern.num_heads if isinstance(pattern, PerHead) else None


def empty(q, k, v, return_lse):
    """Batch 0: empty results that still take part in autograd (zero-size gradients)."""
    b, h, n, _ = q.shape
    out = q.new_zeros(b, h, n, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())
    lse = torch.full((b, h, n), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    return (out, lse) if return_lse else out
