"""q and k as a real model makes them, for timing content-selected patterns on selections that cluster.

Random q and k make scattered selections (every diagonal and block about equally likely);
a trained model's concentrate on a few columns, the nearest diagonals and some blocks, and
that is what vertical-slash and block top-k are designed for. ``captured_qk`` runs one
forward of a model from ``real_models`` (SmolLM2-135M by default) on the first ``n``
tokens of ``real_tasks.stdlib_text()`` under foveal's ``dense`` recipe (equal to its
sdpa) and keeps one layer's q (after RoPE) and k, as its attention sees them.
"""

from __future__ import annotations

import torch

__all__ = ["captured_qk", "LAYER"]

#: the layer captured by default: the middle of SmolLM2's 30
LAYER = 15


class _OneLayer:
    """``observe`` hook of ``sparsify`` keeping the q and k of one layer's first prefill call."""

    def __init__(self, layer: int):
        self.layer, self.qk = layer, None

    def __call__(self, layer, pattern, q, k):
        if layer == self.layer and self.qk is None and q.shape[2] > 1:
            self.qk = (q.detach().clone(), k.detach().clone())


def captured_qk(n: int, layer: int = LAYER, model: str = "smollm2-135m", loaded=None):
    """(q (1, Hq, n, D), k (1, Hkv, n, D)) float32 of layer ``layer`` of ``model`` on the standard text's first
    ``n`` tokens. ``loaded``: a ``real_models.LoadedModel`` to use instead of loading ``model`` (tests: the tiny
    random Llama). ``real_models.ModelMissing`` when the model's packages are not installed."""
    from foveal import recipes
    from foveal.bench import real_models, real_tasks
    from foveal.integrations.transformers import restore, sparsify

    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    loaded = loaded or real_models.load_model(model)
    tok = loaded.tokenizer
    ids = real_tasks.start_tokens(tok) + real_tasks.encode(tok, real_tasks.stdlib_text())
    if len(ids) < n:
        raise ValueError(f"the standard text has {len(ids)} tokens, fewer than n={n}")
    hook = _OneLayer(layer)
    sparsify(loaded.model, recipes.dense(), observe=hook)
    try:
        with torch.no_grad():
            loaded.model(torch.tensor([ids[:n]]), use_cache=False)
    finally:
        restore(loaded.model)
    if hook.qk is None:
        raise ValueError(f"layer {layer} did not run: the model has fewer sparsified layers")
    return hook.qk
