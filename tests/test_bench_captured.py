"""The captured q and k are what the model's attention computes: checked against transformers' own projections
and rotary embedding applied to the layer's input (float64, a tiny random Llama, no weights)."""

import pytest
import torch

pytest.importorskip("transformers")

from foveal.bench import real_models  # noqa: E402
from foveal.bench.captured import captured_qk  # noqa: E402
from foveal.bench.real_tasks import encode, start_tokens, stdlib_text  # noqa: E402


def _independent_qk(model, ids, layer):
    """q and k of ``layer`` from its input hidden state, by transformers' own modules and RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
        x = out.hidden_states[layer]  # the input of decoder layer `layer`
        block = model.model.layers[layer]
        attn = block.self_attn
        h = block.input_layernorm(x)
        b, n, _ = h.shape
        d = attn.head_dim
        q = attn.q_proj(h).view(b, n, -1, d).transpose(1, 2)
        k = attn.k_proj(h).view(b, n, -1, d).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(n)[None])
        return apply_rotary_pos_emb(q, k, cos, sin)


@pytest.mark.parametrize("layer", [0, 1])
def test_captured_q_and_k_are_the_layers_own(layer):
    loaded = real_models.load_model("tiny-llama")
    loaded.model.double()
    n = 96
    q, k = captured_qk(n, layer=layer, loaded=loaded)
    tok = loaded.tokenizer
    ids = torch.tensor([(start_tokens(tok) + encode(tok, stdlib_text()))[:n]])
    want_q, want_k = _independent_qk(loaded.model, ids, layer)
    assert q.shape == (1, 4, n, 8) and k.shape == (1, 2, n, 8)
    torch.testing.assert_close(q, want_q, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(k, want_k, atol=1e-12, rtol=1e-12)


def test_bad_length_and_layer_are_refused():
    loaded = real_models.load_model("tiny-llama")
    with pytest.raises(ValueError, match="n must be"):
        captured_qk(1, loaded=loaded)
    with pytest.raises(ValueError, match="layer 7 did not run"):
        captured_qk(16, layer=7, loaded=loaded)
