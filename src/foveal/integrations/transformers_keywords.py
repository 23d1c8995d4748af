"""Every keyword transformers hands an attention function, and what foveal's backend does with it.

``KEYWORDS`` is the audit (the README's table is this): a keyword is *honoured* (it
changes what ``attend`` computes exactly as it changes the model's own attention),
*inert* (it has no effect on attention in any implementation: a flag for the model's
other parts) or *refused* in the values foveal cannot honour, with a ``ValueError``
naming it. A keyword not in ``KEYWORDS`` is refused by name: nothing is ignored.
"""

from __future__ import annotations

import torch

__all__ = ["KEYWORDS", "Call", "read_keywords", "check_dropout"]

#: keyword -> how the foveal backend handles it
KEYWORDS = {
    "scaling": "honoured: attend(scale=)",
    "dropout": "honoured at 0 (eval); > 0 (training with attention dropout) refused: foveal has no attention dropout",
    "sliding_window": "honoured: the layer's window, FlashAttention's convention (w - 1 keys back; and forward for "
                      "an encoder), checked against the window of the model's mask",
    "softcap": "honoured: attend(softcap=) (Gemma 2's attn_logit_softcapping)",
    "s_aux": "honoured: attend(sink_logits=) (gpt-oss' learned per-head sink logits)",
    "is_causal": "honoured: the causal or the bidirectional (encoder) pattern; checked against the model's mask",
    "position_ids": "honoured: positions that restart in a row (packed sequences, DataCollatorWithFlattening) are "
                    "attended sequence by sequence; 2D (B or 1, n) only",
    "cu_seq_lens_q": "honoured: packed sequence boundaries (must equal cu_seq_lens_k, batch 1)",
    "cu_seq_lens_k": "honoured: as cu_seq_lens_q",
    "max_length_q": "read: must match cu_seq_lens_q",
    "max_length_k": "read: must match cu_seq_lens_k",
    "output_attentions": "False inert; True refused: foveal returns no attention weights",
    "deterministic": "False inert; True (FlashAttention's deterministic backward) refused",
    "encoder_hidden_states": "None inert; cross-attention refused",
    "position_bias": "None inert; an additive position bias (T5) refused",
    "use_cache": "inert: the model's cache is transformers'",
    "output_router_logits": "inert: a mixture-of-experts flag",
    "output_hidden_states": "inert: a flag for the model's outputs",
    "return_dict": "inert: a flag for the model's outputs",
}

class Call:
    """The keywords of one call of the attention function, read and checked (``read_keywords``)."""

    __slots__ = ("scaling", "softcap", "sinks", "sliding_window", "is_causal", "position_ids", "cu_seq_lens")

    def __init__(self):
        self.scaling = self.softcap = self.sinks = self.sliding_window = self.is_causal = None
        self.position_ids = self.cu_seq_lens = None


def _refuse(layer, name, value, allowed):
    shown = f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) else repr(value)
    raise ValueError(f"layer {layer}: the foveal attention backend got {name}={shown}; {allowed}")


def check_dropout(layer, dropout) -> None:
    """Attention dropout (a positive ``dropout``, in training mode) is refused by name."""
    if dropout:
        _refuse(layer, "dropout", dropout, "foveal has no attention dropout: call model.eval() or set the config's "
                                           "attention_dropout to 0 for training")


def read_keywords(layer, scaling, kwargs: dict) -> Call:
    """Every keyword of one call (but ``dropout``: ``check_dropout``) read into a ``Call``, or a ``ValueError``
    naming the one foveal cannot honour."""
    call = Call()
    unknown = sorted(set(kwargs) - set(KEYWORDS))
    if unknown:
        raise ValueError(f"layer {layer}: the foveal attention backend does not know the keyword(s) {unknown} that "
                         f"transformers handed it; it honours or refuses {sorted(KEYWORDS)} and ignores none")
    call.scaling = scaling
    call.softcap = kwargs.get("softcap")
    call.sinks = kwargs.get("s_aux")
    if call.sinks is not None and (not torch.is_tensor(call.sinks) or call.sinks.dim() != 1):
        _refuse(layer, "s_aux", call.sinks, "it must be a (num_heads,) tensor of sink logits")
    window = kwargs.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        _refuse(layer, "sliding_window", window, "it must be None or a positive int")
    call.sliding_window = window
    causal = kwargs.get("is_causal")
    if causal is not None and not isinstance(causal, bool):
        _refuse(layer, "is_causal", causal, "it must be None or a bool")
    call.is_causal = causal
    for name, allowed in (("output_attentions", "foveal returns no attention weights: use attn_implementation='eager'"),
                          ("deterministic", "FlashAttention's deterministic backward is not foveal's to promise")):
        if kwargs.get(name):
            _refuse(layer, name, kwargs[name], allowed)
    for name, allowed in (("encoder_hidden_states", "foveal drives self-attention only, not cross-attention"),
                          ("position_bias", "foveal takes no dense additive position bias (T5): leave this model "
                                            "on its own attention")):
        if kwargs.get(name) is not None:
            _refuse(layer, name, kwargs[name], allowed)
    pos = kwargs.get("position_ids")
    if pos is not None and (not torch.is_tensor(pos) or pos.dim() != 2):
        _refuse(layer, "position_ids", pos, "foveal reads 2D (batch or 1, tokens) position ids (packed sequences); "
                                             "multi-axis (M-RoPE) positions are refused")
    call.position_ids = pos
    cu = [kwargs.get(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if any(x is not None for x in cu):
        cq, ck, mq, mk = cu
        if cq is None or ck is None or not torch.equal(cq.cpu(), ck.cpu()):
            _refuse(layer, "cu_seq_lens_k", ck, f"foveal reads packed self-attention: cu_seq_lens_q and cu_seq_lens_k "
                                                f"must be given and equal (cu_seq_lens_q={cq})")
        lengths = torch.diff(cq.cpu())
        for name, m in (("max_length_q", mq), ("max_length_k", mk)):
            if m is not None and int(m) != int(lengths.max()):
                _refuse(layer, name, m, f"it must be the longest packed sequence, {int(lengths.max())}")
        call.cu_seq_lens = [int(x) for x in cq.cpu()]
    return call
