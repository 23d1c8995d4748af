"""``attend``: attention of q over k/v restricted to a pattern, on a chosen backend.

One straight line: validate the inputs once (``foveal.inputs``) → lower the pattern
into kernel calls (``foveal.lowering``) → select a backend for each
(``foveal.kernels.select``) → run → put the pieces back together (``foveal.eager``).
Under ``torch.compile`` the same validation runs in the traced code and the work is
one opaque custom op (``foveal.custom_op``).
"""

from __future__ import annotations

import torch

from foveal.eager import PATTERNS, empty, run, validate
from foveal.tracing import trace_constant

__all__ = ["attend", "na_av"]


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
    ``blocksparse``, ``flex``, and where the C++ extension is built ``native`` and
    ``native-na``); a backend that cannot run the call says why.
    """
    if torch.compiler.is_compiling() and _built_while_tracing(pattern):
        from foveal.custom_op import attend_outside_graph

        return attend_outside_graph(q, k, v, pattern, bias=bias, scale=scale, key_padding_mask=key_padding_mask,
                                    softcap=softcap, sink_logits=sink_logits, backend=backend, return_lse=return_lse)
    call, sink_logits = validate(q, k, v, pattern, bias, scale, key_padding_mask, softcap, sink_logits, backend,
                                 return_lse)
    if q.shape[0] == 0:
        return empty(q, k, v, return_lse)
    if torch.compiler.is_compiling():  # one opaque op in the graph (foveal.custom_op): it runs ``eager.run``
        from foveal.custom_op import attend_traced

        return attend_traced(q, k, v, call.pattern, bias=call.bias, scale=call.scale,
                             key_padding_mask=call.key_padding_mask, softcap=call.softcap, sink_logits=sink_logits,
                             backend=backend, return_lse=return_lse)
    return run(call, sink_logits, backend, return_lse)


@trace_constant
def _built_while_tracing(pattern) -> bool:
    """Whether torch.compile hands over a pattern that its traced code is still building (its fields not yet
    set on the object): such a pattern cannot be a constant of the graph, and attend runs outside it."""
    if not isinstance(pattern, PATTERNS):
        return False
    try:
        pattern.n_q, pattern.n_kv
    except AttributeError:
        return True
    return False


from foveal.functional_na import na_av  # noqa: E402  (re-exported: NATTEN's weights × values op)
