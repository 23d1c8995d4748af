"""Ready-made pattern recipes for language models: ``recipe(n_q, n_kv, layer_idx, causal=True) -> pattern``.

A recipe says what one attention layer attends to when it has ``n_q`` queries, the
newest of ``n_kv`` tokens (bottom-right, as in FlashAttention: ``n_q == n_kv`` at
prefill, ``n_q = 1`` while decoding). ``foveal.integrations.transformers.sparsify``
asks one for every layer and call; any callable with that signature is a recipe too.
A recipe may answer a ``(n_q, n_kv)`` pattern, or its ``(n_kv, n_kv)`` self-attention
pattern, whose last ``n_q`` rows are then taken. ``causal=False`` asks for an
encoder's (bidirectional) form.

Content-selected recipes (vertical-slash, block top-k, DHSA) select at prefill and
decode densely (every earlier key), as MInference does: their selection needs the
whole query block, which one decoding query is not.
"""

from __future__ import annotations

import inspect

from foveal._checks import positive_int
from foveal.patterns.dynamic import A_SHAPE_LOCAL, A_SHAPE_SINKS, DHSA, BlockTopK, VerticalSlash
from foveal.patterns.global_ import Causal, Full, GlobalTokens, Sinks
from foveal.patterns.local import SlidingWindow
from foveal.patterns.sparse import Power
from foveal.patterns.vertical_slash_ranges import VerticalSlashRanges

__all__ = ["Recipe", "dense", "streaming_llm", "a_shape", "power", "vertical_slash", "vertical_slash_ranges", "block_topk",
           "dhsa", "call_recipe"]


class Recipe:
    """A named pattern factory: ``recipe(n_q, n_kv, layer_idx=0, causal=True)``."""

    #: the recipe's name and parameters, for its repr (``name(k=v, ...)``)
    name: str = "recipe"
    #: whether the recipe has a bidirectional (encoder) form
    has_encoder_form: bool = True

    def __init__(self, **params):
        self.params = params

    def __call__(self, n_q: int, n_kv: int, layer_idx: int = 0, causal: bool = True):
        n_q, n_kv = positive_int("n_q", n_q), positive_int("n_kv", n_kv)
        if n_q > n_kv:
            raise ValueError(f"n_q must be at most n_kv (the queries are the newest of the keys), got {n_q} > {n_kv}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        if not causal:
            if not self.has_encoder_form:
                raise ValueError(f"{self!r} is causal only; it has no bidirectional (encoder) form")
            if n_q != n_kv:
                raise ValueError(f"an encoder's (bidirectional) pattern has n_q == n_kv, got {n_q} and {n_kv}")
            return self.encoder(n_kv)
        return self.causal(n_q, n_kv)

    def causal(self, n_q: int, n_kv: int):
        raise NotImplementedError

    def encoder(self, n: int):
        raise NotImplementedError

    def __repr__(self):
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"

    def __eq__(self, other):
        return type(self) is type(other) and self.params == other.params

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.params.items()))))


class _Dense(Recipe):
    name = "dense"

    def causal(self, n_q, n_kv):
        return Causal(n_q, n_kv=n_kv)

    def encoder(self, n):
        return Full(n)


def dense() -> Recipe:
    """Every earlier key (``Causal``, bottom-right), or every key for an encoder (``Full``): the model as it is."""
    return _Dense()


class _SinksWindow(Recipe):
    """The first ``sinks`` keys and the ``window`` most recent; ``names`` are the paper's words for the two."""

    def __init__(self, name: str, names: tuple[str, str], sinks: int, window: int):
        super().__init__(**{names[0]: positive_int(names[0], sinks, minimum=0), names[1]: positive_int(names[1], window)})
        self.name, self.sinks, self.window = name, sinks, window

    def causal(self, n_q, n_kv):
        local = SlidingWindow(n_q, left=self.window - 1, n_kv=n_kv)
        return local | Sinks(n_q, min(self.sinks, n_kv), n_kv=n_kv) if self.sinks else local

    def encoder(self, n):
        half = (self.window - 1) // 2
        local = SlidingWindow(n, left=half, right=self.window - 1 - half)
        return local | GlobalTokens(n, min(self.sinks, n)) if self.sinks else local


def streaming_llm(sinks: int = 4, window: int = 1024) -> Recipe:
    """StreamingLLM: the first ``sinks`` tokens (attention sinks) and the ``window`` most recent, the query included.

    Query ``i`` sees key ``j <= i`` iff ``j < sinks`` or ``i − j < window`` (transformers'
    ``sliding_window`` convention). Encoder form: a centred window of ``window`` keys and
    ``sinks`` global tokens. Xiao et al., "Efficient Streaming Language Models with
    Attention Sinks" (ICLR 2024).
    """
    return _SinksWindow("streaming_llm", ("sinks", "window"), sinks, window)


def a_shape(sinks: int = A_SHAPE_SINKS, local: int = A_SHAPE_LOCAL) -> Recipe:
    """MInference's A-shape head: the first ``sinks`` keys (``n_init``) and the ``local`` nearest (``n_local``).

    The mask of ``streaming_llm(sinks, window=local)`` and of ``foveal.patterns.a_shape``, with its defaults.
    Jiang et al., "MInference 1.0" (NeurIPS 2024).
    """
    return _SinksWindow("a_shape", ("sinks", "local"), sinks, local)


class _Power(Recipe):
    name = "power"
    has_encoder_form = False

    def causal(self, n_q, n_kv):
        return Power(n_kv, self.params["block"], self.params["window"], self.params["sinks"])  # its last n_q rows


def power(block: int = 64, window: int = 1, sinks: int = 1) -> Recipe:
    """PowerAttention: key blocks at distance 0..``window``, at powers of two, and the first ``sinks`` blocks.

    ``foveal.patterns.Power`` on the whole sequence; while decoding, its last rows.
    Chen et al., "PowerAttention: Exponentially Scaling of Receptive Fields for
    Effective Sparse Attention" (2025).
    """
    return _Power(block=positive_int("block", block), window=positive_int("window", window, minimum=0),
                  sinks=positive_int("sinks", sinks, minimum=0))


class _Selected(Recipe):
    """Content-selected at prefill (``n_q == n_kv``), dense while decoding."""

    make = None

    def causal(self, n_q, n_kv):
        if n_q != n_kv:
            return Causal(n_q, n_kv=n_kv)
        return type(self).make(n_kv, **self.params, causal=True)

    def encoder(self, n):
        return type(self).make(n, **self.params, causal=False)


class _VerticalSlash(_Selected):
    name = "vertical_slash"
    make = VerticalSlash
    has_encoder_form = False  # VerticalSlash is defined for causal attention only


class _VerticalSlashRanges(_VerticalSlash):
    name = "vertical_slash_ranges"
    make = VerticalSlashRanges


class _BlockTopK(_Selected):
    name = "block_topk"
    make = BlockTopK


class _DHSA(_Selected):
    name = "dhsa"
    make = DHSA


def vertical_slash(vertical: int = 1000, slash: int = 6096, **options) -> Recipe:
    """MInference's vertical-slash head: the ``vertical`` key columns and ``slash`` diagonals the last queries score highest.

    ``foveal.patterns.VerticalSlash`` at prefill (``options``: ``last_q``, ``block``, …);
    dense decoding. Jiang et al., "MInference 1.0" (NeurIPS 2024).
    """
    VerticalSlash(2, vertical, slash, **options)  # checks the parameters now, not at the first call
    return _VerticalSlash(vertical=vertical, slash=slash, **options)


def vertical_slash_ranges(vertical: int = 1000, slash: int = 6096, **options) -> Recipe:
    """Vertical-slash as MInference's kernel attends it: each kept diagonal as a whole 64-key range per query block.

    ``foveal.patterns.VerticalSlashRanges`` at prefill (the selection of ``vertical_slash``,
    then MInference's ``convert_vertical_slash_indexes``: a superset of its pairs but for
    columns past a block's last range); dense decoding. Jiang et al., "MInference 1.0" (NeurIPS 2024).
    """
    VerticalSlashRanges(2, vertical, slash, **options)
    return _VerticalSlashRanges(vertical=vertical, slash=slash, **options)


def block_topk(topk: int = 16, block: int = 64, sinks: int = 1) -> Recipe:
    """Each query block attends to the ``topk`` key blocks whose mean key scores highest against its mean query.

    ``foveal.patterns.BlockTopK`` at prefill (its local block and ``sinks`` first
    blocks always kept); dense decoding. The block selection of MoBA and Quest.
    """
    BlockTopK(block, topk, block=block, sinks=sinks)
    return _BlockTopK(topk=topk, block=block, sinks=sinks)


def dhsa(budget: int = 2048, chunk: int = 64) -> Recipe:
    """Dynamic Hierarchical Sparse Attention: chunks scored by their pooled keys, up to ``budget`` keys per query chunk.

    ``foveal.patterns.DHSA`` at prefill; dense decoding. Xiong et al., "DHSA" (2025).
    """
    DHSA(chunk, budget, chunk=chunk)
    return _DHSA(budget=budget, chunk=chunk)


def call_recipe(recipe, n_q: int, n_kv: int, layer_idx: int, causal: bool):
    """``recipe(n_q, n_kv, layer_idx, causal=causal)``, or without ``causal`` for a callable that takes only three."""
    if isinstance(recipe, Recipe) or _takes_causal(recipe):
        return recipe(n_q, n_kv, layer_idx, causal=causal)
    return recipe(n_q, n_kv, layer_idx)


def _takes_causal(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "causal" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
