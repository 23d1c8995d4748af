"""foveal as a Hugging Face transformers attention backend: ``sparsify(model, recipe)`` and ``restore(model)``.

``sparsify`` registers the name ``"foveal"`` with transformers' ``AttentionInterface``
and ``AttentionMaskInterface`` and switches the model to it: from then on the chosen
attention layers attend under ``recipe(n_q, n_kv, layer_idx)`` (see ``foveal.recipes``)
through ``foveal.attend``; the others run transformers' own ``sdpa`` exactly as before,
or foveal's dense pattern where sdpa cannot express the layer (a softcap, sink logits,
packed sequences its mask does not separate).

Nothing the model hands is dropped: every keyword of the attention call is honoured or
refused by name (``KEYWORDS``, ``transformers_keywords``), and the mask function
transformers builds is read (causal or bidirectional, sliding window, packed
sequences) or refused by name (``transformers_masks``). What a layer computes, per
sequence of the batch:

* Positions are the sequence's own: a left-padded sequence's first real token is
  position 0, so it gets exactly what it gets alone (sinks included). The queries are
  the newest ``n_q`` of its ``n_kv`` tokens (bottom-right): ``n_q == n_kv`` at prefill,
  1 while decoding with the model's KV cache, a static cache's unused slots excluded.
* Padding comes from the model's 2D ``attention_mask``. A sequence whose real tokens
  are not one contiguous run (padding inside it) is computed on the padded positions
  with the padding as ``key_padding_mask``. Rows of padding tokens are 0.
* Packed rows (positions restarting, as ``DataCollatorWithFlattening`` makes them, or
  its ``cu_seq_lens_q/k``): each sequence attends within itself, as when alone, as
  ``flash_attention_2`` does; decoding after a packed prefill is refused.
* GQA as the model has it: keys are never repeated. ``scaling``, a ``softcap``
  (Gemma 2) and learned sink logits (gpt-oss' ``s_aux``, as ``attend(sink_logits=)``)
  are the model's. Attention dropout (training) is refused by name.
* Causal layers (``module.is_causal``) ask the recipe for the causal form and refuse a
  pattern under which a query sees a later key; encoders (BERT, ModernBERT) ask for
  ``causal=False``.
* A model's native sliding windows (``sliding_window``: Mistral's and Phi-3's on every
  layer, Gemma 2/3's, Qwen2's, Cohere 2's, gpt-oss' and ModernBERT's (bidirectional)
  on their sliding layers) are kept: ``layers=None`` sparsifies only the other layers,
  and a sliding layer named in ``layers`` runs ``pattern & its window``
  (``windows="keep"``) or the pattern alone (``windows="replace"``; refused while
  decoding when the model's sliding cache no longer holds a key the pattern needs).
* Under ``torch.compile`` (``fullgraph=True`` without an ``attention_mask``) the mask
  function is made in the traced code and cannot be read: each layer derives causal
  and window from itself, one sequence per row, checked on a run-time probe of the
  real mask function (``transformers_masks.traced_spec``); packed rows are refused there.
* Content-selected recipes select at prefill and decode densely (``foveal.recipes``).
  A recipe may return the ``(n_q, n_kv)`` pattern or its square self-attention
  pattern, whose last ``n_q`` rows are then taken (``foveal.decode.step_inputs``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from foveal.cache import LRU
from foveal.custom_op import built
from foveal.decode import step_inputs
from foveal.functional import attend
from foveal.patterns.base import Pattern
from foveal.patterns.dynamic import DynamicPattern
from foveal.patterns.causality import is_causal
from foveal.patterns.local import SlidingWindow
from foveal.patterns.perhead import PerHead
from foveal.integrations.transformers_keywords import KEYWORDS, check_dropout, read_keywords
from foveal.integrations.transformers_masks import MaskInfo, documents, mask_info, traced_spec
from foveal.recipes import call_recipe, dense

__all__ = ["NAME", "register", "sparsify", "restore", "is_sparsified", "MaskInfo", "KEYWORDS"]

#: the name foveal registers with ``AttentionInterface`` and ``AttentionMaskInterface``
NAME = "foveal"

_WINDOWS = ("keep", "replace")
#: model -> its state before ``sparsify``; attention module -> its plan
_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: the patterns recipes answered, by (layer plan, n_q, n_kv): a model asks the same at every step of a length
PATTERNS = LRU("transformers recipe patterns", maxsize=256)


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the tests install it
        raise ImportError("foveal.integrations.transformers needs transformers (pip install transformers)") from e
    return transformers


def register() -> None:
    """Register ``"foveal"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    tf = _transformers()
    tf.AttentionInterface.register(NAME, attention)
    tf.AttentionMaskInterface.register(NAME, mask_info)


# -- one layer's plan -----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Plan:
    recipe: object  # None: the layer is left as the model has it (its own sdpa, or foveal's dense where sdpa cannot)
    layer: int
    causal: bool  # the module's is_causal
    windows: str
    backend: str
    observe: object = None

    def pattern(self, n_q: int, n_kv: int, causal: bool, window):
        """The recipe's pattern for n_q queries, the newest of n_kv tokens: (n_q, n_kv) or square (n_kv, n_kv).

        ``window`` is the layer's native window ``(left, right)`` in key distances, or None.
        """
        return built(_plan_pattern, self, n_q, n_kv, causal, window)  # under torch.compile: built at trace time

    def _build(self, n_q, n_kv, causal, window):
        recipe = dense() if self.recipe is None else self.recipe
        p = call_recipe(recipe, n_q, n_kv, self.layer, causal)
        if not isinstance(p, (Pattern, DynamicPattern, PerHead)):
            raise TypeError(f"recipe {recipe!r} must return a foveal pattern for layer {self.layer}, "
                            f"got {type(p).__name__}")
        if (p.n_q, p.n_kv) not in ((n_q, n_kv), (n_kv, n_kv)):
            raise ValueError(f"recipe {recipe!r} asked for ({n_q}, {n_kv}) at layer {self.layer} returned "
                             f"{p!r} with ({p.n_q}, {p.n_kv}); it must be (n_q, n_kv) or the square (n_kv, n_kv)")
        if isinstance(p, (DynamicPattern, PerHead)) and (p.n_q, p.n_kv) != (n_q, n_kv):
            raise ValueError(f"recipe {recipe!r} returned the content-selected or per-head {p!r} for "
                             f"({n_q}, {n_kv}) at layer {self.layer}: such patterns are only taken as they are")
        if causal and not _causal(p):
            raise ValueError(f"layer {self.layer} is causal but recipe {recipe!r} returned {p!r}, under which a "
                             f"query sees a later key")
        if window is not None and (self.windows == "keep" or self.recipe is None):
            if not isinstance(p, Pattern):
                raise ValueError(f"layer {self.layer} keeps its native window {window} (keys back, forward) but {p!r} "
                                 f"is not a static pattern to intersect with it; pass windows='replace' or other "
                                 f"layers")
            p = p & SlidingWindow(p.n_q, left=window[0], right=window[1], n_kv=p.n_kv)
        return p


def _plan_pattern(plan: _Plan, n_q: int, n_kv: int, causal: bool, window):
    key = (plan, n_q, n_kv, causal, window)  # a plan hashes by identity
    return PATTERNS.get(key, lambda: plan._build(n_q, n_kv, causal, window))


def _causal(p) -> bool:
    if isinstance(p, PerHead):
        return all(_causal(part) for part in p.parts)
    if isinstance(p, DynamicPattern):
        return bool(getattr(p, "causal", False))
    return is_causal(p)


# -- the attention function -----------------------------------------------------------------------
def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention function for ``"foveal"``: q (B, H, n_q, D), k/v (B, Hkv, n_kv, D) -> ((B, n_q, H, D), None).

    Every keyword is read (``foveal.integrations.transformers_keywords.KEYWORDS``): honoured or refused by name.
    """
    plan = _PLANS.get(module)
    layer = getattr(module, "layer_idx", None) if plan is None else plan.layer
    call = read_keywords(layer, scaling, kwargs)
    info = attention_mask
    if plan is None or plan.recipe is None:  # a layer left as the model has it
        if call.softcap is None and call.sinks is None and not _packed_by_keywords(call, info, query):
            from transformers.integrations.sdpa_attention import sdpa_attention_forward  # the model's own sdpa

            mask = info.sdpa_mask() if isinstance(info, MaskInfo) else info
            return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        if plan is None:
            raise ValueError(f"{type(module).__name__} (layer {layer}) is not one of the attention layers sparsify "
                             f"found; foveal cannot run what sdpa cannot express (softcap, s_aux, packed sequences) "
                             f"for it")
        # what sdpa cannot express (a softcap, sink logits, packing its mask does not see): foveal's dense
    check_dropout(layer, dropout)
    if not isinstance(info, MaskInfo):
        raise ValueError(
            f"layer {layer} on foveal got a {type(info).__name__} attention mask; foveal builds each "
            f"layer's pattern from the 2D attention_mask (1 = token, 0 = padding): pass that, not a prepared 4D mask"
        )
    if info.spec is None and info.traced is None:
        raise ValueError(f"layer {layer}: {info.error}")
    spec = _spec(plan, call, info, module, query)
    causal, window = _geometry(plan, call, spec)
    docs = _documents(plan, call, info, spec, query, key)
    out = _attend_layer(plan, query, key, value, info, call, causal, window, docs)
    return out.transpose(1, 2).contiguous(), None


def _spec(plan: _Plan, call, info: MaskInfo, module, query):
    """The model's mask as read (eager), or, while torch.compile traces, as this layer derives it from its causality
    and native window (every row one sequence), checked at run time on a probe of the real mask function."""
    if info.spec is not None:
        return info.spec
    causal = plan.causal if call.is_causal is None else call.is_causal
    w = call.sliding_window if call.sliding_window is not None else native_window(module)
    window = None if w is None else (w - 1, 0) if causal else (w - 1, w - 1)
    return traced_spec(info, causal, window, query.shape[0], query.device)


def _geometry(plan: _Plan, call, spec):
    """(causal, native window) of this call: the module's is_causal and the ``sliding_window`` keyword, each checked
    against the model's own mask (``spec``)."""
    causal = plan.causal if call.is_causal is None else call.is_causal
    if spec.causal != causal:
        raise ValueError(f"layer {plan.layer} is_causal={causal} (the module's, or the is_causal keyword) but the "
                         f"model's mask is {'causal' if spec.causal else 'bidirectional'}; foveal follows neither "
                         f"silently")
    window = spec.window
    if call.sliding_window is not None:  # FlashAttention's convention: w - 1 keys back (and forward, bidirectional)
        w = call.sliding_window - 1
        said = (w, 0) if causal else (w, w)
        if window is not None and said != window:
            raise ValueError(f"layer {plan.layer}: sliding_window={call.sliding_window} means {said} keys (back, "
                             f"forward) but the model's mask has a window of {window}")
        window = said
    return causal, window


def _packed_by_keywords(call, info, query) -> bool:
    """Whether the keywords say the rows are packed sequences that transformers' own mask does not separate."""
    if call.cu_seq_lens is not None:
        return True
    if not isinstance(info, MaskInfo) or info.spec is None or info.spec.packed is not None:
        return False  # under compile (spec None, traced): transformers' own mask, as sdpa runs it when compiled
    return _positions(call, info, query.shape[0], query.shape[2])[0] == "packed"


def _all_real(info: MaskInfo) -> bool:
    if "all_real" not in info.memo:  # one look (a device sync) per forward, not per layer
        info.memo["all_real"] = info.padding is None or bool(info.padding.all())
    return info.memo["all_real"]


def _positions(call, info: MaskInfo, b: int, n: int):
    """What ``position_ids`` say about the rows: ("packed", ids (B, n)) at a prefill whose positions restart,
    ("shifted", first position) while decoding when they do not follow the cache, or (None, None)."""
    pos = call.position_ids
    if pos is None or not _all_real(info):
        return None, None
    memo = info.memo.get("positions")
    if memo is not None and memo[0] is pos:
        return memo[1]
    said = None, None
    if torch.compiler.is_compiling():  # no Python branch on values while tracing: both refused at run time
        if not info.q_offset and n > 1:
            ids = documents(pos.expand(b, -1) if pos.shape[0] == 1 else pos)
            torch._assert_async((ids[:, -1] == 0).all(), "foveal: position_ids restart in a row (packed sequences); "
                                "under torch.compile foveal attends one sequence per row: run packed rows eagerly")
        elif info.q_offset:
            torch._assert_async(pos[0, 0] == info.q_offset, f"foveal: position_ids do not start at the {info.q_offset} "
                                f"tokens the cache holds (decoding after a packed prefill?)")
        info.memo["positions"] = (pos, said)
        return said
    if not info.q_offset and n > 1:
        ids = documents(pos.expand(b, -1) if pos.shape[0] == 1 else pos)
        if bool(ids[:, -1].any()):
            said = "packed", ids
    elif info.q_offset and int(pos[0, 0]) != info.q_offset:
        said = "shifted", int(pos[0, 0])
    info.memo["positions"] = (pos, said)
    return said


def _documents(plan: _Plan, call, info: MaskInfo, spec, q, k):
    """(B, n) packed-sequence ids of this prefill, or None when each row is one sequence."""
    b, n = q.shape[0], q.shape[2]
    docs = spec.packed
    said, what = _positions(call, info, b, n)
    if said == "shifted":
        raise ValueError(f"layer {plan.layer}: position_ids start at {what} but the cache holds {info.q_offset} "
                         f"tokens before these queries (decoding after a packed prefill?); foveal decodes one sequence "
                         f"per row and never attends across packed sequences")
    if docs is None and call.cu_seq_lens is not None:
        cu = call.cu_seq_lens
        if b != 1 or cu[0] != 0 or cu[-1] != n:
            raise ValueError(f"layer {plan.layer}: cu_seq_lens_q={cu} must run from 0 to the {n} tokens of one packed "
                             f"row (batch 1), got a batch of {b}")
        docs = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())[None]
    elif docs is None and said == "packed":
        docs = what
    if docs is None:
        return None
    if info.q_offset or info.kv_offset or k.shape[2] != n or not _all_real(info):
        raise ValueError(f"layer {plan.layer}: packed sequences (position_ids restarting, or cu_seq_lens_q/k) are read "
                         f"at prefill only, without padding: got queries at {info.q_offset}.. over {k.shape[2]} keys")
    if tuple(docs.shape) != (b, n):
        raise ValueError(f"layer {plan.layer}: packed sequence ids of shape {tuple(docs.shape)} for {b} rows of {n}")
    return docs.cpu()


def _attend_layer(plan: _Plan, q, k, v, info: MaskInfo, call, causal, window, docs):
    b, _, n_q, _ = q.shape
    n_kv = k.shape[2]
    end = info.q_offset + n_q  # tokens so far: the query rows are positions end - n_q .. end - 1
    held = min(n_kv, end - info.kv_offset)  # a static cache's slots past the tokens are unused
    if held < 1 or info.kv_offset + held != end or (not causal and (info.q_offset, n_q) != (0, n_kv)):
        raise ValueError(f"layer {plan.layer}: queries at positions {info.q_offset}..{end - 1} and keys at "
                         f"{info.kv_offset}..{info.kv_offset + n_kv - 1} are not the newest of one sequence "
                         f"(an encoder's are all of it)")
    k, v = k[:, :, :held], v[:, :, :held]
    geo = (causal, window)
    runs = _real_runs(info, b, end) if docs is None else _packed_runs(docs)
    out = None  # the zero-filled output, made only when some rows are padding
    if runs is None:  # padding inside a sequence: padded positions, padding as key padding
        pad = ~info_padding(info, b, end)[:, info.kv_offset:end]
        rows = _rows(plan, geo, n_q, end, info.kv_offset, q, k, v)
        return _run(plan, q, rows, call, pad)
    for (first, stop), batch in runs.items():
        # one sequence's tokens are positions first .. stop - 1; its own position 0 is `first`
        lo_q, hi_q = max(info.q_offset, first), min(end, stop)
        if lo_q >= hi_q:
            continue  # every query is padding: 0
        lo_k = max(info.kv_offset, first)
        whole = batch is None or len(batch) == b  # one run covers the batch (no padding, or the same for all)
        idx = None if whole else torch.tensor(batch, device=q.device)
        qs, ks, vs = (t if whole else t.index_select(0, idx) for t in (q, k, v))
        qs = qs[:, :, lo_q - info.q_offset:hi_q - info.q_offset]
        ks = ks[:, :, lo_k - info.kv_offset:stop - info.kv_offset]
        vs = vs[:, :, lo_k - info.kv_offset:stop - info.kv_offset]
        rows = _rows(plan, geo, hi_q - lo_q, stop - first, lo_k - first, qs, ks, vs)
        result = _run(plan, qs, rows, call, None)
        if whole and hi_q - lo_q == n_q:
            return result  # every query row computed: no zero-filled output to copy into
        if out is None:
            out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
        out[slice(None) if whole else idx, :, lo_q - info.q_offset:hi_q - info.q_offset] = result
    return q.new_zeros(q.shape[:-1] + (v.shape[-1],)) if out is None else out


def _packed_runs(docs: torch.Tensor) -> dict:
    """{(first, stop): [rows]}: each packed sequence of each row, a run of its own."""
    runs: dict = {}
    for b in range(docs.shape[0]):
        _, counts = torch.unique_consecutive(docs[b], return_counts=True)
        first = 0
        for c in counts.tolist():
            runs.setdefault((first, first + c), []).append(b)
            first += c
    return runs


def _rows(plan: _Plan, geo, m: int, n: int, k0: int, q, k, v):
    """(pattern, k, v) for the last m of n tokens (positions n - m .. n - 1) over the held keys k0 .. n - 1."""
    p = plan.pattern(m, n, *geo)
    if k0 == 0 and (p.n_q, p.n_kv) == (m, n):
        return p, k, v  # prefill, or a recipe's own cross pattern over every key
    if not isinstance(p, Pattern):
        raise ValueError(f"layer {plan.layer}: {p!r} cannot be read row by row for {m} queries over {n} tokens")
    # the pattern's rows for these queries on the held keys: a cross pattern's query i is row i, a square's n - m + i
    qpos = torch.arange(m) + (n - m if p.n_q == n else 0)
    if k0 and plan.windows == "replace" and bool(p.mask(qpos[:, None], torch.arange(k0)[None, :]).any()):
        raise ValueError(f"layer {plan.layer} replaced its native window by {p!r}, which needs keys before position "
                         f"{k0} that the model's sliding cache no longer holds; decode with windows='keep' or score "
                         f"without the cache (use_cache=False)")
    return step_inputs(p, qpos.to(q.device), torch.arange(k0, n, device=q.device), k, v)


def _run(plan: _Plan, q, rows, call, pad):
    pattern, k, v = rows
    if plan.observe is not None:
        plan.observe(plan.layer, pattern, q, k)
    return attend(q, k, v, pattern, scale=call.scaling, softcap=call.softcap, sink_logits=call.sinks,
                  key_padding_mask=pad, backend=plan.backend)


def info_padding(info: MaskInfo, batch: int, end: int) -> torch.Tensor:
    """(B, end) bool, True = real token, for positions 0 .. end - 1 (missing columns are unused: False)."""
    if info.padding is None:
        return torch.ones(batch, end, dtype=torch.bool)
    pad = info.padding[:, :end]
    if pad.shape[1] < end:
        pad = torch.cat([pad, pad.new_zeros(batch, end - pad.shape[1])], 1)
    return pad


def _real_runs(info: MaskInfo, batch: int, end: int):
    """{(first, stop): [batch indices] (None: all)} of sequences whose real tokens are one run first .. stop - 1, or
    None."""
    if info.padding is None:
        return {(0, end): None}  # None: the whole batch (no list of a batch size torch.compile keeps symbolic)
    real = info_padding(info, batch, end).cpu()
    runs: dict = {}
    for b in range(batch):
        where = torch.nonzero(real[b]).flatten()
        if where.numel() == 0:
            continue  # nothing real: 0
        first, stop = int(where[0]), int(where[-1]) + 1
        if where.numel() != stop - first:
            return None
        runs.setdefault((first, stop), []).append(b)
    return runs


# -- the user's calls -----------------------------------------------------------------------------
def attention_layers(model) -> list:
    """The attention modules of a transformers model that call its attention interface, by layer index.

    A module with ``layer_idx`` and ``is_causal`` (Llama's, Gemma's, BERT's, ModernBERT's attention).
    """
    found = [m for m in model.modules() if getattr(m, "layer_idx", None) is not None and hasattr(m, "is_causal")]
    return sorted(found, key=lambda m: m.layer_idx)


def native_window(module):
    """A layer's native sliding window as transformers hands it (``sliding_window``), or None.

    The module's own ``sliding_window`` (Gemma 2/3, Qwen2, Cohere 2, gpt-oss, ModernBERT), else the
    config's where the config declares no ``layer_types`` (Mistral, Phi-3: every layer slides).
    """
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    config = getattr(module, "config", None)
    if config is None or getattr(config, "layer_types", None) is not None:
        return None
    return getattr(config, "sliding_window", None)


def sparsify(model, pattern, *, layers=None, windows: str = "keep", backend: str = "auto", observe=None):
    """From now on the model's attention layers attend under ``pattern(n_q, n_kv, layer_idx)`` on foveal.

    ``pattern`` is a recipe (``foveal.recipes``: ``streaming_llm``, ``a_shape``,
    ``power``, ``vertical_slash``, ``block_topk``, ``dhsa``, ``dense``) or any callable
    ``(n_q, n_kv, layer_idx[, causal=])`` returning a foveal pattern (static, ``PerHead``
    or content-selected). ``layers``: the layer indices to sparsify (default: every
    layer without a native sliding window; refused when every layer has one, as in
    Mistral: name them). ``windows``: ``"keep"`` (a native sliding
    layer named in ``layers`` runs ``pattern & its window``) or ``"replace"``.
    ``backend`` is ``attend``'s. ``observe(layer_idx, pattern, q, k)``, if given, sees
    every foveal call before it runs (e.g. to measure the density a content-selected
    pattern keeps). The other layers run transformers' ``sdpa`` (foveal's dense pattern
    where sdpa cannot express them). Returns the model
    (changed in place); ``restore(model)`` undoes it.
    """
    transformers = _transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not callable(pattern):
        raise TypeError(f"pattern must be a recipe: a callable pattern(n_q, n_kv, layer_idx) -> foveal pattern, "
                        f"got {type(pattern).__name__}")
    if windows not in _WINDOWS:
        raise ValueError(f"windows must be one of {_WINDOWS}, got {windows!r}")
    from foveal.kernels.select import check_backend_name

    check_backend_name(backend)
    if observe is not None and not callable(observe):
        raise TypeError(f"observe must be None or a callable observe(layer_idx, pattern, q, k), got {observe!r}")
    modules = attention_layers(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention layer foveal can drive (modules with layer_idx "
                         f"and is_causal, as transformers' Llama, Gemma, BERT and ModernBERT attention)")
    by_index = {m.layer_idx: m for m in modules}
    if layers is None:
        chosen = [i for i, m in by_index.items() if native_window(m) is None]
        if not chosen:
            raise ValueError(f"every attention layer of {type(model).__name__} has a native sliding window "
                             f"(sliding_window={native_window(modules[0])}) and layers=None sparsifies only the "
                             f"others: "
                             f"name the layers, e.g. layers={sorted(by_index)} (windows='keep' intersects the recipe "
                             f"with each window, 'replace' replaces it)")
    else:
        if isinstance(layers, int) or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be None or a list of layer indices, got {layers!r}")
        chosen = list(layers)
        bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or i not in by_index]
        if bad:
            raise ValueError(f"layers must be indices of the model's attention layers 0..{max(by_index)}, got {bad}")
    if is_sparsified(model):
        restore(model)
    register()
    _MODELS[model] = model.config._attn_implementation
    for i, m in by_index.items():  # the layers not chosen keep the model's attention (recipe None)
        _PLANS[m] = _Plan(pattern if i in chosen else None, i, bool(m.is_causal), windows, backend,
                          observe if i in chosen else None)
    model.set_attn_implementation(NAME)
    return model


def is_sparsified(model) -> bool:
    """Whether ``sparsify`` changed this model (and ``restore`` has not undone it)."""
    return model in _MODELS


def restore(model):
    """Undo ``sparsify``: the model attends with the implementation it had before. Returns the model."""
    if not is_sparsified(model):
        raise ValueError(f"{type(model).__name__} was not sparsified by foveal (or was restored already)")
    for m in attention_layers(model):
        _PLANS.pop(m, None)
    model.set_attn_implementation(_MODELS.pop(model))
    return model
