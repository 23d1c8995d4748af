"""foveal as a Hugging Face transformers attention backend: ``sparsify(model, recipe)`` and ``restore(model)``.

``sparsify`` registers the name ``"foveal"`` with transformers' ``AttentionInterface``
and ``AttentionMaskInterface`` and switches the model to it: from then on the chosen
attention layers attend under ``recipe(n_q, n_kv, layer_idx)`` (see ``foveal.recipes``)
through ``foveal.attend``; the others run transformers' own ``sdpa`` exactly as before.

What a layer computes, per sequence of the batch:

* Positions are the sequence's own: a left-padded sequence's first real token is
  position 0, so it gets exactly what it gets alone (sinks included). The queries are
  the newest ``n_q`` of its ``n_kv`` tokens (bottom-right): ``n_q == n_kv`` at prefill,
  1 while decoding with the model's KV cache, a static cache's unused slots excluded.
* Padding comes from the model's 2D ``attention_mask``. A sequence whose real tokens
  are not one contiguous run (padding inside it) is computed on the padded positions
  with the padding as ``key_padding_mask``. Rows of padding tokens are 0.
* GQA as the model has it: keys are never repeated. ``scaling`` and a ``softcap``
  (Gemma 2) are the model's.
* Causal layers (``module.is_causal``) ask the recipe for the causal form and refuse a
  pattern under which a query sees a later key; encoders (BERT) ask for
  ``causal=False``.
* A model's native sliding-window layers (Gemma 3's) keep their window: ``layers=None``
  sparsifies only the other layers, and a sliding layer named in ``layers`` runs
  ``pattern & its window`` (``windows="keep"``) or the pattern alone
  (``windows="replace"``; refused while decoding when the model's sliding cache no
  longer holds a key the pattern needs).
* Content-selected recipes select at prefill and decode densely (``foveal.recipes``).
  A recipe may return the ``(n_q, n_kv)`` pattern or its square self-attention
  pattern, whose last ``n_q`` rows are then taken (``foveal.decode.step_inputs``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from foveal.cache import LRU
from foveal.custom_op import built
from foveal.decode import step_inputs
from foveal.functional import attend
from foveal.patterns.base import Pattern
from foveal.patterns.dynamic import DynamicPattern
from foveal.patterns.global_ import is_causal
from foveal.patterns.local import SlidingWindow
from foveal.patterns.perhead import PerHead
from foveal.recipes import call_recipe

__all__ = ["NAME", "register", "sparsify", "restore", "is_sparsified", "MaskInfo"]

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


# -- the mask: what transformers hands every layer ----------------------------------------------
@dataclass
class MaskInfo:
    """What a layer needs instead of a dense mask: the 2D padding, offsets and sizes transformers computed.

    ``padding`` (B, ≥ kv_offset + kv_length) bool, True = real token, or None; query
    ``i`` is at absolute position ``q_offset + i``, key ``j`` at ``kv_offset + j``.
    ``sdpa_kwargs`` rebuild transformers' own sdpa mask for the layers left dense.
    """

    padding: torch.Tensor | None
    q_offset: int
    kv_offset: int
    q_length: int
    kv_length: int
    local_size: int | None
    sdpa_kwargs: dict = field(repr=False, default_factory=dict)
    _sdpa: list = field(repr=False, default_factory=list)
    #: transformers reads ``attention_mask.ndim`` on anything that is not a 4D tensor
    ndim = 0

    def sdpa_mask(self):
        """transformers' own ``sdpa_mask`` for these arguments (built once)."""
        if not self._sdpa:
            from transformers.masking_utils import sdpa_mask

            self._sdpa.append(sdpa_mask(**self.sdpa_kwargs))
        return self._sdpa[0]


def _mask_info(**kwargs):
    """transformers' mask function for ``"foveal"``: a ``MaskInfo`` instead of an N×N mask."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, MaskInfo):  # generate() with a static cache feeds the prepared mask back in
        return mask
    # a static cache's offsets are tensors updated in place: read them now
    offsets = {"q_offset": int(kwargs.get("q_offset", 0)), "kv_offset": int(kwargs.get("kv_offset", 0))}
    return MaskInfo(
        padding=None if mask is None else mask.bool(),
        q_length=kwargs["q_length"],
        kv_length=kwargs["kv_length"],
        local_size=kwargs.get("local_size"),
        sdpa_kwargs={**kwargs, **offsets},
        **offsets,
    )


def register() -> None:
    """Register ``"foveal"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    tf = _transformers()
    tf.AttentionInterface.register(NAME, attention)
    tf.AttentionMaskInterface.register(NAME, _mask_info)


# -- one layer's plan -----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Plan:
    recipe: object
    layer: int
    causal: bool
    window: int | None  # the layer's native sliding window (transformers' convention: q − kv < window)
    windows: str
    backend: str
    observe: object = None

    def pattern(self, n_q: int, n_kv: int):
        """The recipe's pattern for n_q queries, the newest of n_kv tokens: (n_q, n_kv) or square (n_kv, n_kv)."""
        return built(_plan_pattern, self, n_q, n_kv)  # under torch.compile: a constant, built at trace time

    def _build(self, n_q, n_kv):
        p = call_recipe(self.recipe, n_q, n_kv, self.layer, self.causal)
        if not isinstance(p, (Pattern, DynamicPattern, PerHead)):
            raise TypeError(f"recipe {self.recipe!r} must return a foveal pattern for layer {self.layer}, "
                            f"got {type(p).__name__}")
        if (p.n_q, p.n_kv) not in ((n_q, n_kv), (n_kv, n_kv)):
            raise ValueError(f"recipe {self.recipe!r} asked for ({n_q}, {n_kv}) at layer {self.layer} returned "
                             f"{p!r} with ({p.n_q}, {p.n_kv}); it must be (n_q, n_kv) or the square (n_kv, n_kv)")
        if isinstance(p, (DynamicPattern, PerHead)) and (p.n_q, p.n_kv) != (n_q, n_kv):
            raise ValueError(f"recipe {self.recipe!r} returned the content-selected or per-head {p!r} for "
                             f"({n_q}, {n_kv}) at layer {self.layer}: such patterns are only taken as they are")
        if self.causal and not _causal(p):
            raise ValueError(f"layer {self.layer} is causal but recipe {self.recipe!r} returned {p!r}, under which a "
                             f"query sees a later key")
        if self.window is not None and self.windows == "keep":
            if not isinstance(p, Pattern):
                raise ValueError(f"layer {self.layer} keeps its native window of {self.window} but {p!r} is not a "
                                 f"static pattern to intersect with it; pass windows='replace' or other layers")
            p = p & SlidingWindow(p.n_q, left=self.window - 1, n_kv=p.n_kv)
        return p


def _plan_pattern(plan: _Plan, n_q: int, n_kv: int):
    return PATTERNS.get((plan, n_q, n_kv), lambda: plan._build(n_q, n_kv))  # a plan hashes by identity


def _causal(p) -> bool:
    if isinstance(p, PerHead):
        return all(_causal(part) for part in p.parts)
    if isinstance(p, DynamicPattern):
        return bool(getattr(p, "causal", False))
    return is_causal(p)


# -- the attention function -----------------------------------------------------------------------
def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention function for ``"foveal"``: q (B, H, n_q, D), k/v (B, Hkv, n_kv, D) -> ((B, n_q, H, D), None)."""
    plan = _PLANS.get(module)
    if plan is None:  # a layer left dense: transformers' own sdpa under its own mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        mask = attention_mask.sdpa_mask() if isinstance(attention_mask, MaskInfo) else attention_mask
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    if not isinstance(attention_mask, MaskInfo):
        raise ValueError(
            f"layer {plan.layer} on foveal got a {type(attention_mask).__name__} attention mask; foveal builds each "
            f"layer's pattern from the 2D attention_mask (1 = token, 0 = padding): pass that, not a prepared 4D mask"
        )
    if dropout:
        raise ValueError(f"foveal has no attention dropout, got dropout={dropout} at layer {plan.layer}: "
                         f"call model.eval() or set the config's attention_dropout to 0")
    out = _attend_layer(plan, query, key, value, attention_mask, scaling, kwargs.get("softcap"))
    return out.transpose(1, 2).contiguous(), None


def _attend_layer(plan: _Plan, q, k, v, info: MaskInfo, scale, softcap):
    b, _, n_q, _ = q.shape
    n_kv = k.shape[2]
    end = info.q_offset + n_q  # tokens so far: the query rows are positions end - n_q .. end - 1
    held = min(n_kv, end - info.kv_offset)  # a static cache's slots past the tokens are unused
    if held < 1 or info.kv_offset + held != end or (not plan.causal and (info.q_offset, n_q) != (0, n_kv)):
        raise ValueError(f"layer {plan.layer}: queries at positions {info.q_offset}..{end - 1} and keys at "
                         f"{info.kv_offset}..{info.kv_offset + n_kv - 1} are not the newest of one sequence "
                         f"(an encoder's are all of it)")
    k, v = k[:, :, :held], v[:, :, :held]
    runs = _real_runs(info, b, end)
    out = None  # the zero-filled output, made only when some rows are padding
    if runs is None:  # padding inside a sequence: padded positions, padding as key padding
        pad = ~info_padding(info, b, end)[:, info.kv_offset:end]
        rows = _rows(plan, n_q, end, info.kv_offset, q, k, v)
        return _run(plan, q, rows, scale, softcap, pad)
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
        rows = _rows(plan, hi_q - lo_q, stop - first, lo_k - first, qs, ks, vs)
        result = _run(plan, qs, rows, scale, softcap, None)
        if whole and hi_q - lo_q == n_q:
            return result  # every query row computed: no zero-filled output to copy into
        if out is None:
            out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
        out[slice(None) if whole else idx, :, lo_q - info.q_offset:hi_q - info.q_offset] = result
    return q.new_zeros(q.shape[:-1] + (v.shape[-1],)) if out is None else out


def _rows(plan: _Plan, m: int, n: int, k0: int, q, k, v):
    """(pattern, k, v) for the last m of n tokens (positions n - m .. n - 1) over the held keys k0 .. n - 1."""
    p = plan.pattern(m, n)
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


def _run(plan: _Plan, q, rows, scale, softcap, pad):
    pattern, k, v = rows
    if plan.observe is not None:
        plan.observe(plan.layer, pattern, q, k)
    return attend(q, k, v, pattern, scale=scale, softcap=softcap, key_padding_mask=pad, backend=plan.backend)


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
    """The attention modules of a transformers model that call its attention interface, by layer index."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling") and hasattr(m, "is_causal")]
    return sorted(found, key=lambda m: m.layer_idx)


def sparsify(model, pattern, *, layers=None, windows: str = "keep", backend: str = "auto", observe=None):
    """From now on the model's attention layers attend under ``pattern(n_q, n_kv, layer_idx)`` on foveal.

    ``pattern`` is a recipe (``foveal.recipes``: ``streaming_llm``, ``a_shape``,
    ``power``, ``vertical_slash``, ``block_topk``, ``dhsa``, ``dense``) or any callable
    ``(n_q, n_kv, layer_idx[, causal=])`` returning a foveal pattern (static, ``PerHead``
    or content-selected). ``layers``: the layer indices to sparsify (default: every
    layer without a native sliding window). ``windows``: ``"keep"`` (a native sliding
    layer named in ``layers`` runs ``pattern & its window``) or ``"replace"``.
    ``backend`` is ``attend``'s. ``observe(layer_idx, pattern, q, k)``, if given, sees
    every foveal call before it runs (e.g. to measure the density a content-selected
    pattern keeps). The other layers run transformers' ``sdpa``. Returns the model
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
        raise ValueError(f"{type(model).__name__} has no attention layer foveal can drive (modules with layer_idx, "
                         f"scaling and is_causal, as transformers' Llama, Gemma and BERT attention)")
    by_index = {m.layer_idx: m for m in modules}
    if layers is None:
        chosen = [i for i, m in by_index.items() if getattr(m, "sliding_window", None) is None]
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
    for i in chosen:
        m = by_index[i]
        _PLANS[m] = _Plan(pattern, i, bool(m.is_causal), getattr(m, "sliding_window", None), windows, backend, observe)
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
