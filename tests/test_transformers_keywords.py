"""The keyword audit: every keyword an installed transformers family hands its attention function is in
``KEYWORDS`` (honoured, inert or refused in the values foveal cannot honour) or refused by name; the mask functions
transformers builds are read (causal, bidirectional, windows, packing) or refused by name; errors name the keyword,
the value and what is allowed."""

import ast
import glob
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import foveal.integrations.transformers as fi  # noqa: E402
from foveal import recipes  # noqa: E402
from foveal.integrations.transformers import KEYWORDS, sparsify  # noqa: E402
from foveal.integrations.transformers_masks import read_mask_function  # noqa: E402
from test_transformers_families import build, tokens  # noqa: E402

from transformers import masking_utils as mu  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def handed_keywords():
    """{keyword: families} of every keyword the installed transformers' models pass to attention_interface(...):
    each call's text (comments dropped) up to its closing parenthesis, parsed alone."""
    found: dict = {}
    root = os.path.dirname(transformers.__file__)
    for path in glob.glob(os.path.join(root, "models", "*", "modeling_*.py")):
        text = re.sub(r"#[^\n]*", "", open(path, encoding="utf-8").read())
        for start in (m.end() for m in re.finditer(r"\battention_interface\(", text)):
            depth, i = 1, start
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            call = ast.parse("f(" + text[start:i], mode="eval").body
            for kw in call.keywords:
                if kw.arg is not None:
                    found.setdefault(kw.arg, set()).add(os.path.basename(os.path.dirname(path)))
    return found


def layer_call(model, n=6, **kw):
    """foveal's attention function called as the model's first layer would call it."""
    module = fi.attention_layers(model)[0]
    q = torch.randn(1, 4, n, 8, dtype=torch.float64)
    k = v = torch.randn(1, 2, n, 8, dtype=torch.float64)
    info = fi.mask_info(batch_size=1, q_length=n, kv_length=n, mask_function=mu.causal_mask_function,
                        attention_mask=None)
    return fi.attention(module, q, k, v, info, **{"scaling": 0.3, **kw})


def test_every_keyword_the_installed_families_hand_is_audited_or_refused_by_name():
    handed = handed_keywords()
    assert {"scaling", "dropout", "sliding_window", "softcap", "s_aux", "is_causal"} <= set(handed)
    model = build("llama", "sdpa")
    sparsify(model, recipes.dense())
    positional = {"query", "key", "value", "attention_mask"}  # the function's own parameters, passed by name
    for name in sorted(set(handed) - set(KEYWORDS) - positional):
        with pytest.raises(ValueError, match=rf"does not know the keyword\(s\) \['{name}'\]"):
            layer_call(model, **{name: None})


@pytest.mark.parametrize("keyword, value, message", [
    ("output_attentions", True, "output_attentions=True; foveal returns no attention weights"),
    ("deterministic", True, "deterministic=True; FlashAttention's deterministic backward"),
    ("encoder_hidden_states", torch.zeros(1, 6, 32), r"encoder_hidden_states=a tensor of shape \(1, 6, 32\); .*cross"),
    ("position_bias", torch.zeros(1, 4, 6, 6), r"position_bias=a tensor of shape \(1, 4, 6, 6\)"),
    ("is_causal", False, "is_causal=False .* but the model's mask is causal"),
    ("sliding_window", 0, "sliding_window=0; it must be None or a positive int"),
    ("s_aux", torch.zeros(4, 1), r"s_aux=a tensor of shape \(4, 1\); it must be a \(num_heads,\) tensor"),
    ("position_ids", torch.zeros(3, 1, 6, dtype=torch.long), r"position_ids=a tensor of shape \(3, 1, 6\)"),
    ("dropout", 0.1, "dropout=0.1; foveal has no attention dropout"),
])
def test_values_foveal_cannot_honour_are_refused_naming_keyword_and_value(keyword, value, message):
    model = build("llama", "sdpa")
    sparsify(model, recipes.dense())
    with pytest.raises(ValueError, match=message):
        layer_call(model, **{keyword: value})
    layer_call(model, output_attentions=False, deterministic=False, encoder_hidden_states=None, position_bias=None,
               use_cache=True, is_causal=True)  # the inert values run


def test_a_window_keyword_that_contradicts_the_mask_is_refused():
    model = build("llama", "sdpa")
    sparsify(model, recipes.dense())
    module = fi.attention_layers(model)[0]
    q = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    info = fi.mask_info(batch_size=1, q_length=6, kv_length=6, attention_mask=None,
                        mask_function=mu.sliding_window_causal_mask_function(4))
    with pytest.raises(ValueError, match=r"sliding_window=3 means \(2, 0\) .* the model's mask has a window of \(3, 0"):
        fi.attention(module, q, q[:, :2], q[:, :2], info, scaling=0.3, sliding_window=3)


def test_dropout_in_training_mode_is_refused_by_name_and_runs_at_zero():
    model = build("llama", "sdpa")
    for m in fi.attention_layers(model):
        m.attention_dropout = 0.25
    sparsify(model, recipes.dense())
    model.train()
    with pytest.raises(ValueError, match="dropout=0.25; foveal has no attention dropout"):
        model(tokens(1, 8))
    for m in fi.attention_layers(model):
        m.attention_dropout = 0.0
    model(tokens(1, 8)).logits.sum().backward()  # training without attention dropout runs, with gradients


def test_transformers_mask_functions_are_read_or_refused_by_name():
    causal = read_mask_function(mu.causal_mask_function)
    assert (causal.causal, causal.window, causal.packed) == (True, None, None)
    assert read_mask_function(mu.sliding_window_causal_mask_function(8)).window == (7, 0)  # kv > q - 8
    assert read_mask_function(mu.sliding_window_bidirectional_mask_function(4)).window == (4, 4)  # |q - kv| <= 4
    assert read_mask_function(mu.bidirectional_mask_function).causal is False
    ids = torch.tensor([[0, 0, 1, 1, 1]])
    spec = read_mask_function(mu.and_masks(mu.remap_positions_for_packed_sequence(
        mu.causal_mask_function, torch.tensor([[0, 1, 0, 1, 2]])), mu.packed_sequence_mask_function(ids)))
    assert spec.causal and spec.packed is ids
    with pytest.raises(ValueError, match="chunked_overlay"):
        read_mask_function(mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)))
    with pytest.raises(ValueError, match="or_masks"):
        read_mask_function(mu.or_masks(mu.causal_mask_function, mu.bidirectional_mask_function))
    with pytest.raises(ValueError, match="is not one of transformers' own"):
        read_mask_function(lambda b, h, q, kv: q >= kv)


def test_a_mask_foveal_cannot_read_is_refused_by_its_layers_and_left_to_sdpa_elsewhere():
    model = build("llama", "sdpa")
    ids = tokens(1, 10)
    image = lambda b, h, q, kv: kv < 3  # noqa: E731  a model's own overlay (as an image-token block)
    with torch.no_grad():
        want = model.model(ids).last_hidden_state
    sparsify(model, recipes.dense(), layers=[1])
    module = fi.attention_layers(model)[1]
    info = fi.mask_info(batch_size=1, q_length=10, kv_length=10, attention_mask=None,
                        mask_function=mu.or_masks(mu.causal_mask_function, image))
    q = torch.randn(1, 4, 10, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="layer 1: mask_function .*or_masks"):
        fi.attention(module, q, q[:, :2], q[:, :2], info, scaling=0.3)
    with torch.no_grad():  # the layer left to the model reads its own sdpa mask as before
        torch.testing.assert_close(model.model(ids).last_hidden_state, want, atol=1e-10, rtol=1e-10)
