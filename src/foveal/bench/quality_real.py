"""Suite ``quality-real``: every pattern inside real pretrained models, training-free.

Each recipe of ``foveal.recipes`` replaces the attention of a pretrained model through
``foveal.integrations.transformers.sparsify`` (SmolLM2: every layer; Gemma 3: its 3 global layers, the 15
sliding ones keep their native 512-token window; MiniLM: every layer, in the recipes' encoder forms),
at matched densities, and is compared with the model's own ``sdpa`` (full attention) on:

* language modelling on ``real_tasks.stdlib_text()`` (its first ``L`` tokens): perplexity, KL(full ‖ pattern)
  and top-1 agreement with full attention at every ``lm_stride``-th position of the second half (``L/2 ..
  L-2``, each predicting the next token: past every window at the suite's densities, where the patterns cut
  context), and the prefill time of that forward (the first segment's) as a ratio to the model's own sdpa:
  after a model's rows, every recipe and sdpa are timed in ``PREFILL_ROUNDS`` interleaved rounds
  (``time_prefill``; medians, without the density hook);
* passkey retrieval at several lengths × depths and RULER's multi-key needle (``real_tasks``): greedy
  generation through the model's KV cache (static patterns decode under their rows; content-selected ones
  select at prefill and decode densely), exact match of the first number generated;
* MiniLM: cosine of the sentence embedding (mean pooling over the attention mask, L2-normalised, as
  sentence-transformers does) to full attention's, on 512-token chunks of the text.

Densities are shares of the dense pairs: of the causal pairs ``n(n+1)/2`` (decoders) or of all ``n²``
(encoders). Each recipe has one integer knob, solved by bisection on the recipe's own pattern density at
the task's length (content-selected ones: on what they select from the model's own q and k of every
sparsified layer, captured in a full-attention forward on the text's first n tokens); the density
each actually got inside the model is measured with ``sparsify(..., observe=)`` (static: allowed pairs;
content-selected: pairs its selection kept on the model's own q and k) over all sparsified layers, heads and
prefill calls. Output: ``quality-real.md`` (tables), ``quality-real.json`` and one
``quality-real-<model>.png`` (quality against density per task) in ``--out``.

Suites (``SUITES``; times on a 2-core CPU with the machine to itself):

* ``real-quick`` (about 2 minutes): SmolLM2 only, 1024 tokens, every recipe at density 0.1; passkey at
  1024 tokens × depths 0.1, 0.5, 0.9; multi-key (4 needles) at 1024, 3 trials.
* ``real`` (about 33 minutes, 8 of them timing prefill): SmolLM2, Gemma 3 and MiniLM, every recipe at
  densities 0.05, 0.1 and 0.2; LM at 2048 tokens (every 2nd scored position for SmolLM2, every 4th for Gemma: 512 and 256); passkey
  at 1024 and 2048 × 3 depths; multi-key at 2048, 3 trials; 8 MiniLM chunks of 512. No 4096-token tasks:
  three prompts of 4k per row would double the run.
* ``real-long`` (about 25 minutes): SmolLM2 with all 30 layers sparse at density 0.1 (``LONG``: streaming_llm,
  block_topk, vertical_slash, vertical_slash_ranges), knobs solved at 8192 tokens; LM and prefill time at 8192
  (every 16th scored position; prefill in 2 interleaved rounds); a passkey a third of the way into 4096 and 8192
  tokens: the native-kernel issue's end-to-end case.
"""

from __future__ import annotations

import functools
import math
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from foveal import recipes
from foveal.bench import real_tasks as RT
from foveal.bench.measure import progress
from foveal.bench.memory import steady_heap
from foveal.bench.density import allowed_pairs, solve_knob
from foveal.bench.report import save_partial, write_report
from foveal.bench.timing import time_interleaved, timed
from foveal.patterns.dynamic import DynamicPattern

__all__ = ["FAMILIES", "SUITES", "SIZES", "RealSuite", "cases", "run_suite", "solve_knob", "solve_recipe",
           "recipe_density", "QKCapture", "DensityMeter", "run_real_quality"]

NAME = "quality-real"


# -- the recipes and their knob ------------------------------------------------------------------------------------
def block_for(n: int) -> int:
    """Block (chunk) of block top-k and DHSA at length n: n/128, at least 8 (16 at 2048 tokens)."""
    return max(8, n // 128)


@dataclass(frozen=True)
class Family:
    """A recipe with one integer knob: ``make(knob, n)``, the knob in ``[1, hi(n)]``; density grows with it."""

    make: Callable
    knob: str
    hi: Callable
    note: str


FAMILIES = {
    "dense": Family(lambda k, n: recipes.dense(), "-", lambda n: 1, "foveal's Causal / Full: must equal sdpa"),
    "streaming_llm": Family(lambda k, n: recipes.streaming_llm(sinks=4, window=k), "window", lambda n: n,
                            "4 attention sinks + window (StreamingLLM)"),
    "window": Family(lambda k, n: recipes.streaming_llm(sinks=0, window=k), "window", lambda n: n,
                     "the window alone (streaming_llm with sinks=0)"),
    "a_shape": Family(lambda k, n: recipes.a_shape(sinks=max(1, k // 8), local=k), "local", lambda n: n,
                      "MInference's A-shape: local keys and local/8 initial ones (its default 128:1024)"),
    "power": Family(lambda k, n: recipes.power(block=k, window=1, sinks=1), "block", lambda n: n,
                    "PowerAttention: blocks at distance 0, 1 and powers of two, 1 sink block"),
    "vertical_slash": Family(
        lambda k, n: recipes.vertical_slash(vertical=k, slash=k, last_q=64, block=64, always_vertical=min(4, k),
                                            always_slash=min(16, k), min_vertical=0, min_slash=0),
        "vertical = slash", lambda n: n,
        "MInference: k columns and k diagonals scored by the last 64 queries; first 4 columns, 16 nearest forced"),
    "vertical_slash_ranges": Family(
        lambda k, n: recipes.vertical_slash_ranges(vertical=k, slash=k, last_q=64, block=64, always_vertical=min(4, k),
                                                   always_slash=min(16, k), min_vertical=0, min_slash=0),
        "vertical = slash", lambda n: n,
        "vertical_slash's selection as MInference's kernel attends it: diagonals as whole 64-key ranges"),
    "block_topk": Family(lambda k, n: recipes.block_topk(topk=k, block=block_for(n), sinks=1), "topk",
                         lambda n: -(-n // block_for(n)), "top-k key blocks of n/128 tokens by pooled q·k, 1 sink"),
    "dhsa": Family(lambda k, n: recipes.dhsa(budget=k, chunk=block_for(n)), "budget", lambda n: n,
                   "DHSA: whole chunks of n/128 tokens by chunk similarity within a key budget"),
}
STATIC = ("streaming_llm", "window", "a_shape", "power")
SELECTED = ("vertical_slash", "vertical_slash_ranges", "block_topk", "dhsa")


def dense_pairs(n_q: int, n_kv: int, causal: bool) -> int:
    """Pairs of full attention: the n_q newest of n_kv tokens see every earlier key (causal) or every key."""
    if not causal:
        return n_q * n_kv
    return n_q * (n_kv - n_q) + n_q * (n_q + 1) // 2


def kept_pairs(selection) -> int:
    """Allowed (query, key) pairs of a ``BlockSelection``, summed over batch and heads.

    A vertical-slash selection (``info`` with ``columns`` and ``offsets``, mask ``j <= i and (column j or
    offset i - j)``) is counted in O(n): Σ_j col_j (n - j) + Σ_o off_o (n - o) - Σ_j col_j #{o <= n-1-j kept},
    the pairs a column and a diagonal both give once; ``keys_kept`` evaluates its blocks elementwise
    (hundreds of ms per layer at 2k tokens). A selection of whole blocks with ``partial`` marks (block top-k) counts
    its full blocks by their sizes and evaluates only the partial ones (the diagonal): ``keys_kept`` evaluates
    every kept block (seconds per probe of the solver at 8k tokens over 30 layers). Others:
    ``selection.keys_kept()``.
    """
    from foveal.patterns.dynamic import BlockSelection

    info = selection.info
    if selection.method == "VerticalSlash" and {"columns", "offsets"} <= set(info):
        col, off = info["columns"].long(), info["offsets"].long()
        n = col.shape[-1]
        w = n - torch.arange(n, device=col.device)
        both = (col * off.cumsum(-1).flip(-1)).sum()
        return int((col * w).sum() + (off * w).sum() - both)
    if selection.method == "VerticalSlashRanges" and {"range_starts", "range_ends", "column_index"} <= set(info):
        return _ranges_pairs(info["range_starts"], info["range_ends"], info["column_index"], selection.n,
                             selection.block)
    if selection.partial is not None and selection.kv_tokens is None:
        kv, part, n, bs = selection.kv_blocks, selection.partial, selection.n, selection.block
        kept = kv >= 0
        rows = (n - torch.arange(kv.shape[2], device=kv.device) * bs).clamp(max=bs)  # tokens of each query block
        cols = (n - kv.clamp(min=0) * bs).clamp(0, bs)  # tokens of each kept key block
        full = int(((kept & ~part) * rows[:, None] * cols).sum())
        marked = torch.where(kept & part, kv, -1).sort(-1, descending=True).values  # the partial ones first
        m = int((kept & part).sum(-1).max()) if kv.numel() else 0
        if m == 0:
            return full
        only = BlockSelection(n, bs, marked[..., :m], None, selection.mask_fn, selection.method)
        return full + int(only.keys_kept().sum())
    return int(selection.keys_kept().sum())


def _ranges_pairs(starts, ends, columns, n: int, block: int) -> int:
    """Pairs of a ``VerticalSlashRanges`` selection from its tables: per query row ``i``, the keys ``j <= i`` of its
    block's ranges (disjoint) and of its gathered columns (outside them). O(B·H·n·(R + V)), no mask evaluated."""
    nb = starts.shape[2]
    i = (torch.arange(nb, device=starts.device)[:, None] * block + torch.arange(block, device=starts.device))
    live = (i < n)[None, None, :, None, :]  # (1, 1, nb, 1, block)
    i = i[None, None, :, None, :]
    s, e = starts[..., None], ends[..., None]
    in_ranges = ((torch.minimum(e, i + 1) - s).clamp(min=0) * ((s >= 0) & live)).sum()
    c = columns[..., None]
    in_columns = ((c >= 0) & (c <= i) & live).sum()
    return int(in_ranges + in_columns)


def recipe_density(recipe, n: int, causal: bool, qk=None) -> float:
    """The recipe's density at ``n`` tokens: allowed pairs / dense pairs.

    A content-selected recipe's pairs are those it keeps on ``qk`` (a list of (q, k), e.g. every layer's of a
    model, ``QKCapture``), or on random q and k without it.
    """
    p = recipe(n, n, 0, causal=causal)
    if qk and isinstance(p, DynamicPattern):
        kept = sum(kept_pairs(p.select(q, k)) for q, k in qk)
        return kept / sum(dense_pairs(n, n, causal) * q.shape[0] * q.shape[1] for q, _ in qk)
    return allowed_pairs(p) / dense_pairs(n, n, causal)


def solve_recipe(family: str, target: float, n: int, causal: bool = True, qk=None):
    """``(recipe, knob, density)`` of ``FAMILIES[family]`` nearest ``target`` at ``n`` tokens.

    Content-selected recipes are solved on ``qk`` if given (see ``recipe_density``). Raises ``ValueError``
    where the recipe has no such form (e.g. no encoder form).
    """
    fam = FAMILIES[family]
    if family == "dense":
        return fam.make(0, n), 0, 1.0
    try:
        probe = fam.make(1, n)(n, n, 0, causal=causal)  # refuses now if there is no such form
    except ValueError as e:
        raise ValueError(f"{family} has no {'causal' if causal else 'encoder (causal=False)'} form: {e}") from e
    if not isinstance(probe, DynamicPattern):
        qk = None
    if qk is None:
        return _solve_alone(family, target, n, causal)
    knob, density = solve_knob(lambda k: recipe_density(fam.make(k, n), n, causal, qk), target, 1, fam.hi(n))
    return fam.make(knob, n), knob, density


@functools.lru_cache(maxsize=None)
def _solve_alone(family, target, n, causal):
    fam = FAMILIES[family]
    knob, density = solve_knob(lambda k: recipe_density(fam.make(k, n), n, causal), target, 1, fam.hi(n))
    return fam.make(knob, n), knob, density


class QKCapture:
    """``observe`` hook keeping every layer's q and k of the first prefill call it sees (to solve knobs on)."""

    def __init__(self):
        self.qk: dict = {}

    def __call__(self, layer, pattern, q, k):
        if q.shape[2] > 1 and layer not in self.qk:
            self.qk[layer] = (q.detach().clone(), k.detach().clone())


# -- the density a pattern actually got ----------------------------------------------------------------------------
class DensityMeter:
    """``observe`` hook for ``sparsify``: pairs kept / dense pairs over every prefill call (n_q > 1) it sees.

    Static patterns count their allowed pairs (``num_allowed``, once per pattern); content-selected ones
    select on the layer's own q and k (``kept_pairs(select(q, k))``, scale ``1/sqrt(head_dim)``, the scale of
    the models here).
    """

    def __init__(self, causal: bool):
        self.causal = causal
        self._static: dict = {}
        self.reset()

    def reset(self):
        self.kept = self.dense = 0

    def __call__(self, layer, pattern, q, k):
        b, h, n_q, _ = q.shape
        n_kv = k.shape[2]
        if n_q > 1:
            if isinstance(pattern, DynamicPattern):
                kept = kept_pairs(pattern.select(q, k))
            else:
                if pattern not in self._static:
                    self._static[pattern] = pattern.num_allowed()
                kept = self._static[pattern] * b * h
            self.kept += kept
            self.dense += dense_pairs(n_q, n_kv, self.causal) * b * h

    @property
    def density(self) -> float:
        return self.kept / self.dense if self.dense else float("nan")


# -- suites --------------------------------------------------------------------------------------------------------
#: timed forwards per recipe (and for the model's own sdpa), in rounds over all of them; the median is reported
PREFILL_ROUNDS = 3


@dataclass(frozen=True)
class RealSuite:
    """What one suite runs. Per-model fields can be overridden in ``per_model[name]``."""

    models: tuple[str, ...]
    families: tuple[str, ...]
    densities: tuple[float, ...]
    lm_length: int
    lm_segments: int = 1
    #: score every lm_stride-th position of the second half
    lm_stride: int = 1
    passkey_lengths: tuple[int, ...] = ()
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    multikey_length: int = 0  # 0: no multi-key task
    multikey_keys: int = 4
    multikey_trials: int = 3
    encoder_length: int = 512
    encoder_chunks: int = 8
    #: the models of ``models`` that are encoders (one task: embeddings)
    encoders: tuple[str, ...] = ("minilm-l6",)
    #: interleaved rounds of the prefill timing (each contender also runs twice untimed first)
    prefill_rounds: int = PREFILL_ROUNDS
    per_model: dict = field(default_factory=dict)

    def for_model(self, name: str) -> "RealSuite":
        return replace(self, **self.per_model.get(name, {}))


ALL = ("dense",) + STATIC + SELECTED
#: the end-to-end long-context case of the native-kernel issue: every layer sparse at density 0.1
LONG = ("streaming_llm", "block_topk", "vertical_slash", "vertical_slash_ranges")
SUITES = {
    # about 2 minutes on a 2-core CPU: SmolLM2 only, 1024 tokens, one density
    "real-quick": RealSuite(models=("smollm2-135m",), families=ALL, densities=(0.1,), lm_length=1024,
                            passkey_lengths=(1024,), depths=(0.1, 0.5, 0.9), multikey_length=1024,
                            multikey_trials=3),
    # about 33 minutes on a 2-core CPU (2 more the first time, de-quantising the GGUF models)
    "real": RealSuite(models=("smollm2-135m", "gemma3-270m", "minilm-l6"), families=ALL,
                      densities=(0.05, 0.1, 0.2), lm_length=2048, lm_stride=2, passkey_lengths=(1024, 2048),
                      depths=(0.1, 0.5, 0.9), multikey_length=2048, multikey_trials=3,
                      per_model={"gemma3-270m": {"lm_stride": 4}}),
    # about 25 minutes on a 2-core CPU: SmolLM2 prefill at 8192 tokens with all 30 layers sparse (LONG, density
    # 0.1) against its own sdpa, 2 timed rounds; a passkey a third of the way into 4096 and 8192 tokens
    "real-long": RealSuite(models=("smollm2-135m",), families=LONG, densities=(0.1,), lm_length=8192, lm_stride=16,
                           passkey_lengths=(4096, 8192), depths=(1 / 3,), prefill_rounds=2),
    # seconds: a tiny random Llama (no weights), a static and a content-selected recipe, one passkey length
    "real-dry": RealSuite(models=("tiny-llama",), families=("dense", "window", "block_topk"), densities=(0.2,),
                          lm_length=256, passkey_lengths=(512,), depths=(0.5,), encoders=()),
}
#: registry sizes (``foveal bench run quality-real --size S``) → ``SUITES``
SIZES = {"dry": "real-dry", "quick": "real-quick", "full": "real", "long": "real-long"}


# -- running one model ---------------------------------------------------------------------------------------------
def _lm_segments(tok, text_ids, spec):
    start = RT.start_tokens(tok)
    m = spec.lm_length - len(start)
    if len(text_ids) < spec.lm_segments * m:
        raise ValueError(f"the text has {len(text_ids)} tokens, fewer than {spec.lm_segments} × {m}")
    return [torch.tensor([start + text_ids[i * m:(i + 1) * m]]) for i in range(spec.lm_segments)]


def lm_positions(n: int, stride: int) -> torch.Tensor:
    """The positions scored: every ``stride``-th of the second half, ``n/2 .. n-2`` (each predicts the next token)."""
    return torch.arange(n // 2, n - 1, stride)


def _forward_lm(model, ids, stride):
    """Log-probabilities at ``lm_positions`` (logits only there: a 262k vocabulary costs as much as the model)."""
    with torch.no_grad():
        logits = model(ids, logits_to_keep=lm_positions(ids.shape[1], stride), use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), -1)


def _lm_metrics(ref, got, targets, chunk: int = 128) -> dict:
    """Sums over positions of NLL, KL(ref ‖ got) and top-1 agreement, chunked (vocabularies are large)."""
    nll = kl = agree = 0.0
    for s in range(0, got.shape[0], chunk):
        r, g, t = ref[s:s + chunk], got[s:s + chunk], targets[s:s + chunk]
        nll += float(-g.gather(-1, t[:, None]).sum())
        kl += float((r.exp() * (r - g)).sum())
        agree += float((r.argmax(-1) == g.argmax(-1)).sum())
    return {"nll": nll, "kl": kl, "agree": agree, "count": got.shape[0]}


def _spread(i: int, trials: int, keys: int) -> int:
    """The needle trial ``i`` asks for (by depth rank): spread from the shallowest to the deepest."""
    return 0 if trials == 1 else round(i * (keys - 1) / (trials - 1))


def _generate(model, tok, prompts, new_tokens):
    ids = torch.tensor([p.ids for p in prompts])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad)
    return [tok.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in out]


class _Causal:
    """The tasks of a causal LM, with full attention's references computed once."""

    def __init__(self, loaded, spec: RealSuite, text_ids):
        self.loaded, self.spec = loaded, spec
        self.model, self.tok = loaded.model, loaded.tokenizer
        self.segments = _lm_segments(self.tok, text_ids, spec)
        self.prompts = {}  # task key -> list of prompts
        for n in spec.passkey_lengths:
            self.prompts[("passkey", n)] = [RT.passkey_prompt(self.tok, text_ids, n, d, seed=1000 * n + i)
                                            for i, d in enumerate(spec.depths)]
        if spec.multikey_length:
            n = spec.multikey_length
            self.prompts[("multikey", n)] = [
                RT.multikey_prompt(self.tok, text_ids, n, spec.multikey_keys, seed=2000 * n + i,
                                   asked=_spread(i, spec.multikey_trials, spec.multikey_keys))
                for i in range(spec.multikey_trials)]
        self.text_ids, self._qk = text_ids, {}
        self.ref = None

    def tasks(self):
        return [("lm", self.spec.lm_length)] + list(self.prompts)

    def qk(self, n):
        """Every layer's q and k under full attention on the text's first n tokens (to solve knobs on; cached)."""
        if n not in self._qk:
            start = RT.start_tokens(self.tok)
            self._qk[n] = _capture(self.model, torch.tensor([start + self.text_ids[:n - len(start)]]),
                                   logits_to_keep=1)
        return self._qk[n]

    def new_tokens(self, prompts):
        return max(len(RT.encode(self.tok, " " + p.answer)) for p in prompts) + 1

    def prefill(self):
        """The timed forward: the LM forward of the first segment."""
        return _forward_lm(self.model, self.segments[0], self.spec.lm_stride)

    def reference(self):
        """Full attention (the model's own sdpa): log-probabilities, and its own scores."""
        with torch.no_grad():
            self.model(self.segments[0][:, :16])  # warm-up
        self.ref = [_forward_lm(self.model, ids, self.spec.lm_stride) for ids in self.segments]

    def run(self, task, meter: DensityMeter | None) -> dict:
        kind, n = task
        if meter is not None:
            meter.reset()
        if kind == "lm":
            sums = []
            for ids, ref in zip(self.segments, self.ref):
                got = _forward_lm(self.model, ids, self.spec.lm_stride)
                sums.append(_lm_metrics(ref, got, ids[0, lm_positions(ids.shape[1], self.spec.lm_stride) + 1]))
            count = sum(s["count"] for s in sums)
            return {"ppl": math.exp(sum(s["nll"] for s in sums) / count), "kl": sum(s["kl"] for s in sums) / count,
                    "top1": sum(s["agree"] for s in sums) / count, "positions": count}
        prompts = self.prompts[task]
        texts = _generate(self.model, self.tok, prompts, self.new_tokens(prompts))
        hits = [RT.score(p, g) for p, g in zip(prompts, texts)]
        return {"accuracy": sum(hits) / len(hits), "trials": len(hits),
                "answers": [{"depth": round(p.depth, 3), "answer": p.answer, "generated": g, "ok": h}
                            for p, g, h in zip(prompts, texts, hits)]}


class _Encoder:
    """MiniLM: sentence embeddings of 512-token chunks against full attention's."""

    def __init__(self, loaded, spec: RealSuite, text_ids):
        self.loaded, self.spec = loaded, spec
        tok = loaded.tokenizer
        n = min(spec.encoder_length, loaded.max_length)
        m = n - 2
        if len(text_ids) < spec.encoder_chunks * m:
            raise ValueError(f"the text has {len(text_ids)} tokens, fewer than {spec.encoder_chunks} × {m}")
        self.ids = torch.tensor([[tok.cls_token_id] + text_ids[i * m:(i + 1) * m] + [tok.sep_token_id]
                                 for i in range(spec.encoder_chunks)])
        self.mask = torch.ones_like(self.ids)
        self.ref = None

    def tasks(self):
        return [("embedding", self.ids.shape[1])]

    def qk(self, n):
        """Every layer's q and k under full attention on the first two chunks (cached)."""
        if not hasattr(self, "_qk"):
            self._qk = _capture(self.loaded.model, self.ids[:2], attention_mask=self.mask[:2])
        return self._qk

    def _embed(self):
        with torch.no_grad():
            h = self.loaded.model(self.ids, attention_mask=self.mask).last_hidden_state
        m = self.mask[..., None].to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    def prefill(self):
        """The timed forward: the embeddings of every chunk."""
        return self._embed()

    def reference(self):
        with torch.no_grad():
            self.loaded.model(self.ids[:1, :16])  # warm-up
        self.ref = self._embed()

    def run(self, task, meter: DensityMeter | None) -> dict:
        if meter is not None:
            meter.reset()
        emb = self._embed()
        cos = (emb * self.ref).sum(-1)
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "chunks": emb.shape[0]}


def _capture(model, ids, **kwargs):
    """[(q, k)] of every sparsifiable layer in one forward of ``ids`` under foveal's dense (equal to sdpa)."""
    from foveal.integrations.transformers import restore, sparsify

    capture = QKCapture()
    sparsify(model, recipes.dense(), observe=capture)
    try:
        with torch.no_grad():
            model(ids, use_cache=False, **kwargs)
    finally:
        restore(model)
    return [capture.qk[i] for i in sorted(capture.qk)]


def _jobs(spec: RealSuite, limit: int | None):
    """(family, target) rows of a model: the reference first, then every family at every density."""
    rows = [("full", 1.0)]
    for fam in spec.families:
        for target in (1.0,) if fam == "dense" else spec.densities:
            rows.append((fam, target))
    return rows if limit is None else rows[:1 + limit]


def _run_model(loaded, spec: RealSuite, text_ids, limit, step, out_rows, save):
    from foveal.integrations.transformers import restore, sparsify

    causal = loaded.kind == "causal"
    runner = (_Causal if causal else _Encoder)(loaded, spec, text_ids)
    tasks = runner.tasks()
    jobs = _jobs(spec, limit)
    runner.reference()
    solutions, to_time = {}, {}  # (family, target) -> recipe of the rows whose prefill is timed
    for fam, target in jobs:
        for task in _row_tasks(fam, tasks):
            kind, n = task
            step(f"{loaded.name}: {fam} @ {target:g}, {kind} {n}")
            row = {"model": loaded.name, "family": fam, "target_density": target, "task": kind, "length": n}
            try:
                if fam == "full":
                    row.update(recipe="the model's own sdpa", knob=None, density_solved=1.0, density=1.0,
                               **runner.run(task, None))
                else:
                    if (fam, target, n) not in solutions:  # selections are solved on the model's q, k
                        qk = runner.qk(n) if fam in SELECTED else None
                        solutions[fam, target, n] = timed(lambda: solve_recipe(fam, target, n, causal, qk))
                    (recipe, knob, solved), solve_s = solutions[fam, target, n]
                    meter = DensityMeter(causal)
                    sparsify(loaded.model, recipe, observe=meter)
                    try:
                        result = runner.run(task, meter)
                    finally:
                        restore(loaded.model)
                    row.update(recipe=repr(recipe), knob=knob, density_solved=solved, solve_s=solve_s,
                               density=meter.density, **result)
                    if kind in ("lm", "embedding"):
                        to_time[fam, target] = recipe
                row["status"] = "ok"
            except ValueError as e:  # a recipe without such a form, or one that refuses: a result, not a crash
                row["status"] = f"skipped: {str(e).splitlines()[0][:160]}"
            except (RuntimeError, TypeError, IndexError) as e:  # a failing row must not end a 30-minute run
                row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            out_rows.append(row)
            save()
    step(f"{loaded.name}: prefill of {len(to_time)} recipes and sdpa, {spec.prefill_rounds} interleaved rounds")
    times = time_prefill(loaded.model, runner.prefill, to_time, spec.prefill_rounds)
    for row in out_rows:
        if row["model"] == loaded.name and row["task"] in ("lm", "embedding") and row["status"] == "ok":
            key = "full" if row["family"] == "full" else (row["family"], row["target_density"])
            row["prefill_s"] = times[key]
            row["prefill_ratio"] = times[key] / times["full"]
    return {"title": loaded.title, "kind": loaded.kind, "sdpa_prefill_s": times["full"],
            "prefill_rounds": spec.prefill_rounds, "sparsified_layers": _sparsified_layers(loaded.model),
            "tasks": [list(t) for t in tasks]}


def time_prefill(model, prefill, recipes_by_key: dict, rounds: int = PREFILL_ROUNDS) -> dict:
    """Median seconds of ``prefill()`` under the model's own attention (``"full"``) and under each recipe.

    Every contender runs twice untimed (a cold call and one measuring memory), then once per round, the rounds
    going over all contenders in turn, so that the machine's drift hits them alike
    (``timing.time_interleaved``). A recipe is put on by
    ``sparsify`` (no ``observe`` hook) and taken off by ``restore`` around each of its calls.
    """
    from foveal.integrations.transformers import restore, sparsify

    def under(recipe):
        def call():
            sparsify(model, recipe)
            try:
                return prefill()
            finally:
                restore(model)

        return call

    fns = {"full": prefill, **{key: under(r) for key, r in recipes_by_key.items()}}
    with torch.no_grad():
        medians = time_interleaved(fns, torch.device("cpu"), min_runs=rounds, max_runs=rounds, min_seconds=0.0,
                                   slow=float("inf"), keep=False)
    return {key: r["median_s"] for key, r in medians.items()}


def _sparsified_layers(model) -> list[int]:
    from foveal.integrations.transformers import attention_layers

    return [m.layer_idx for m in attention_layers(model) if getattr(m, "sliding_window", None) is None]


def _row_tasks(family: str, tasks: list) -> list:
    """The tasks of one row, the LM (timed) forward last: the pattern's layouts are built by then. foveal's
    ``dense`` runs only the LM forward: its prefill time and exactness (the tests check that it generates
    what sdpa generates)."""
    return tasks[:1] if family == "dense" else tasks[1:] + tasks[:1]


def _steps(spec: RealSuite, limit) -> int:
    total = 0
    for name in spec.models:
        s = spec.for_model(name)
        tasks = [0] if name in s.encoders else [0] * (1 + len(s.passkey_lengths) + (1 if s.multikey_length else 0))
        total += sum(len(_row_tasks(fam, tasks)) for fam, _ in _jobs(s, limit)) + 1  # + the prefill timing
    return total


# -- the run -------------------------------------------------------------------------------------------------------
def cases(size: str) -> list[str]:
    """The cases of a size: per model, the reference and every (recipe, target density) row."""
    spec = SUITES[SIZES[size]]
    return [f"{name}: {fam} @ {target:g}" for name in spec.models for fam, target in _jobs(spec.for_model(name), None)]


def run_suite(size: str, out_dir: str = "bench-out", *, device=None, contenders=None, limit=None) -> dict:
    """The registry's entry: ``run_real_quality`` of a size; ``limit``: the first pattern rows of each model."""
    if device not in (None, "cpu") or contenders is not None:
        raise ValueError("the quality-real suite runs its models on CPU with every recipe: --device and --contenders "
                         "do not apply (--limit runs the first rows)")
    return run_real_quality(SIZES[size], out_dir, limit=limit)


def run_real_quality(suite: str = "real-quick", out_dir: str = "bench-out", *, load=None, progress_bar: bool = True,
                     limit: int | None = None) -> dict:
    """Run a suite; write ``quality-real.{json,md}`` and ``quality-real-<model>.png`` into ``out_dir``.

    ``load(name) -> real_models.LoadedModel`` (default ``real_models.load_model``); ``limit`` runs only the
    first ``limit`` pattern rows of each model (a check that a suite starts).
    """
    from foveal.bench import real_models

    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    spec = SUITES[suite]
    if load is None:
        load = real_models.load_model
        for name in spec.models:  # refuse before any work when a model is not installed
            real_models.check_installed(name)
    import transformers

    transformers.logging.set_verbosity_error()
    steady_heap()  # timings of whole-model forwards are otherwise at the mercy of page faults
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = RT.stdlib_text()
    rows, models = [], {}
    total, done, start = _steps(spec, limit), [0], time.perf_counter()

    def step(label):
        if progress_bar:
            progress(done[0], total, label, start)
        done[0] += 1

    for name in spec.models:
        s = spec.for_model(name)
        loaded, load_s = timed(lambda name=name: load(name))
        if (loaded.kind == "encoder") != (name in s.encoders):
            raise ValueError(f"model {name} is a {loaded.kind} model; the suite's encoders are {s.encoders}")
        text_ids = RT.encode(loaded.tokenizer, text)
        models[name] = {"load_s": load_s, "text_tokens": len(text_ids)}
        models[name].update(_run_model(loaded, s, text_ids, limit, step, rows, lambda: save_partial(out, NAME, rows)))
        del loaded
    if progress_bar:
        progress(total, total, "done", start)
        sys.stderr.write("\n")
    result = {
        "suite": suite,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}",
        "text": {"modules": list(RT.TEXT_MODULES), "characters": len(text), "version": RT.text_version()},
        "spec": {k: v for k, v in spec.__dict__.items()},
        "families": {k: {"knob": f.knob, "note": f.note} for k, f in FAMILIES.items()},
        "models": models,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    plots = {name: functools.partial(plot, result, name) for name in models}
    write_report(out, NAME, result, report(result), plots)
    return result


# -- report --------------------------------------------------------------------------------------------------------
def _cell(row, key, fmt):
    if row is None:
        return ""
    if row.get("status") != "ok":
        return row.get("status", "")[:48]
    v = row.get(key)
    return "" if v is None else fmt.format(v)


def _task_label(task, n):
    names = {"lm": "LM {}", "passkey": "passkey@{}", "multikey": "multi-key@{}", "embedding": "embedding {}"}
    return names[task].format(n)


def report(result) -> str:
    """Markdown: per model, one line per (pattern, target density), the tasks in columns."""
    lines = [f"suite `{result['suite']}` ({result['machine']}), {result['seconds']:.0f} s in all; text: docstrings of "
             f"{len(result['text']['modules'])} standard-library modules ({result['text']['characters']} characters, "
             f"{result['text']['version']})", ""]
    for name, info in result["models"].items():
        rows = [r for r in result["rows"] if r["model"] == name]
        tasks = [tuple(t) for t in info["tasks"]]
        layers = info["sparsified_layers"]
        lines += [f"**{info['title']}** ({info['kind']}; patterns on layers {_ranges(layers)}; "
                  f"{info['text_tokens']} text tokens; sdpa prefill {info['sdpa_prefill_s']:.2f} s, median of "
                  f"{info['prefill_rounds']} interleaved rounds)", ""]
        keys = list(dict.fromkeys((r["family"], r["target_density"]) for r in rows))
        first = tasks[0]
        if info["kind"] == "encoder":
            head = ["pattern", "target", "recipe", "density", "cos mean", "cos min", "prefill × sdpa"]
        else:
            head = ["pattern", "target", f"recipe at {first[1]}", "density", "ppl", "KL", "top-1"] + \
                   [_task_label(*t) for t in tasks[1:]] + ["prefill × sdpa"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for fam, target in keys:
            by_task = {(r["task"], r["length"]): r for r in rows if (r["family"], r["target_density"]) == (fam, target)}
            r0 = by_task.get(first)
            if r0 is not None and r0.get("status") != "ok":  # the reason once, not in every column
                lines.append(f"| {fam} | {target:g} | {r0['status'].replace('|', '/')} |" + " |" * (len(head) - 3))
                continue
            recipe = (r0 or {}).get("recipe", "")
            cells = [fam, f"{target:g}", recipe.replace("|", "/"), _cell(r0, "density", "{:.3f}")]
            if info["kind"] == "encoder":
                cells += [_cell(r0, "cos_mean", "{:.4f}"), _cell(r0, "cos_min", "{:.4f}")]
            else:
                cells += [_cell(r0, "ppl", "{:.3f}"), _cell(r0, "kl", "{:.4f}"), _cell(r0, "top1", "{:.3f}")]
                for t in tasks[1:]:
                    r = by_task.get(t)
                    acc = _cell(r, "accuracy", "{:.2f}")
                    if r is not None and r.get("status") == "ok":
                        acc += f" ({r['density']:.2f})" if fam not in ("full", "dense") else ""
                    cells.append(acc)
            cells.append(_cell(r0, "prefill_ratio", "{:.2f}"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["density: pairs kept / dense pairs (causal pairs for decoders), measured inside the model on the "
              "sparsified layers (retrieval columns: the density at that length in parentheses); ppl, KL(full ‖ "
              "pattern) and top-1 agreement with full attention at the scored positions of the second half; "
              "retrieval: exact-match accuracy of greedy generation (3 depths or trials: 0, 0.33, 0.67, 1); "
              "prefill × sdpa: the median time of the LM (embedding) forward under the recipe over the model's own "
              "sdpa's, every recipe and sdpa timed in the same interleaved rounds; dense: foveal's Causal (Full), "
              "the LM forward only.", ""]
    return "\n".join(lines) + "\n"


def _ranges(xs) -> str:
    xs = sorted(xs)
    if xs and xs == list(range(xs[0], xs[-1] + 1)) and len(xs) > 2:
        return f"{xs[0]}–{xs[-1]}"
    return ", ".join(map(str, xs))


def _panels(result, name):
    """(title, task, length, metric key) of one model's panels."""
    info = result["models"][name]
    tasks = [tuple(t) for t in info["tasks"]]
    if info["kind"] == "encoder":
        n = tasks[0][1]
        return [(f"embedding cosine to full ({n} tokens)", "embedding", n, "cos_mean"),
                ("prefill time ÷ sdpa", "embedding", n, "prefill_ratio")]
    n = tasks[0][1]
    out = [(f"perplexity ({n} tokens)", "lm", n, "ppl"), ("KL(full ‖ pattern)", "lm", n, "kl"),
           ("top-1 agreement with full", "lm", n, "top1")]
    out += [(f"{_task_label(k, m)} accuracy", k, m, "accuracy") for k, m in tasks[1:]]
    return out + [("prefill time ÷ sdpa", "lm", n, "prefill_ratio")]


def plot(result, name: str, path: Path):
    """Quality against measured density, one panel per task and metric, one line per pattern family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = _panels(result, name)
    rows = [r for r in result["rows"] if r["model"] == name and r.get("status") == "ok"]
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    families = [f for f in dict.fromkeys(r["family"] for r in rows) if f not in ("full", "dense")]
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    xs = [r["density"] for r in rows if r["family"] in families and r.get("density") == r.get("density")]
    targets = sorted({r["target_density"] for r in rows if r["family"] in families})
    for ax, (title, task, n, key) in zip(axes.flat, panels):
        mine = [r for r in rows if r["task"] == task and r["length"] == n and r.get(key) is not None]
        ref = next((r for r in mine if r["family"] == "full"), None)
        if ref is not None:
            ax.axhline(ref[key], color="black", ls="--", lw=1, label="full attention (sdpa)")
        dense = next((r for r in mine if r["family"] == "dense"), None)
        if dense is not None and key == "prefill_ratio":
            ax.axhline(dense[key], color="grey", ls=":", lw=1, label="dense on foveal")
        for fam in families:
            pts = sorted((r["density"], r[key]) for r in mine if r["family"] == fam)
            if pts:
                ax.plot(*zip(*pts), marker="s" if fam in SELECTED else "o", ls="-" if len(pts) > 1 else "",
                        color=colors[fam], label=fam)
        if key in ("kl", "prefill_ratio"):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.tick_params(axis="y", which="minor", labelsize=6)
        if key.startswith("accuracy") or key == "top1":
            ax.set_ylim(-0.05, 1.05)
        if xs:
            ax.set_xscale("log")
            ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
            ax.set_xticks(targets)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("density (measured)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[len(panels) - 1].get_legend_handles_labels()  # the prefill panel has every line
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    info = result["models"][name]
    fig.suptitle(f"foveal bench quality --suite {result['suite']}: {info['title']}", fontsize=11)
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, 0.65 / height, 1, 1 - 0.3 / height))  # room for the legend and the title
    fig.savefig(path, dpi=100)
    plt.close(fig)
