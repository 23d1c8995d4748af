"""Every family of the installed transformers that foveal drives, on a tiny random configuration built here
(float64, no weights): ``recipes.dense()`` on every layer equals the model's own attention — its ``sdpa``, or its
``eager`` where sdpa cannot express the family (Gemma 2's softcap, gpt-oss' sink logits) — on a padded batch, native
windows included; and a model's window, softcap or sinks do matter in these configurations (dropping one would be
seen)."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import foveal.integrations.transformers as fi  # noqa: E402
from foveal import recipes  # noqa: E402
from foveal.integrations.transformers import restore, sparsify  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97
N = 24  # longer than every window below
TOL = dict(atol=1e-10, rtol=1e-10)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


def _decoder(config, model, **extra):
    return lambda attn: model(config(**{**SMALL, **extra}, attn_implementation=attn))


def _gpt_oss(attn):
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **SMALL, sliding_window=8, layer_types=["sliding_attention", "full_attention"], num_local_experts=4,
        num_experts_per_tok=2, attn_implementation=attn, experts_implementation="eager"))
    with torch.no_grad():
        for m in fi.attention_layers(model):
            m.sinks.normal_(0, 2)  # learned sink logits that matter
    return model


def _bert(attn):
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, attn_implementation=attn), add_pooling_layer=False)


def _modernbert(attn):
    return transformers.ModernBertModel(transformers.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, local_attention=8, global_attn_every_n_layers=3, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, cls_token_id=1, sep_token_id=2, attn_implementation=attn))


tf = transformers
#: family -> (builder(attn_implementation), the model's own attention to compare with, what makes it differ)
FAMILIES = {
    "llama": (_decoder(tf.LlamaConfig, tf.LlamaForCausalLM), "sdpa", None),
    "mistral": (_decoder(tf.MistralConfig, tf.MistralForCausalLM, sliding_window=8), "sdpa", "window"),
    "qwen2": (_decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM, use_sliding_window=True, sliding_window=8,
                       max_window_layers=1), "sdpa", "window"),
    "qwen3": (_decoder(tf.Qwen3Config, tf.Qwen3ForCausalLM, use_sliding_window=True, sliding_window=8,
                       max_window_layers=1), "sdpa", "window"),
    "phi3": (_decoder(tf.Phi3Config, tf.Phi3ForCausalLM, sliding_window=8), "sdpa", "window"),
    "olmo2": (_decoder(tf.Olmo2Config, tf.Olmo2ForCausalLM), "sdpa", None),
    "cohere2": (_decoder(tf.Cohere2Config, tf.Cohere2ForCausalLM, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"]), "sdpa", "window"),
    "gemma": (_decoder(tf.GemmaConfig, tf.GemmaForCausalLM), "sdpa", None),
    "gemma2": (_decoder(tf.Gemma2Config, tf.Gemma2ForCausalLM, sliding_window=8, attn_logit_softcapping=0.5,
                        initializer_range=0.3, query_pre_attn_scalar=8), "eager", "softcap"),
    "gemma3": (_decoder(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, sliding_window=8, query_pre_attn_scalar=8,
                        layer_types=["sliding_attention", "full_attention"]), "sdpa", "window"),
    "gpt_oss": (_gpt_oss, "eager", "s_aux"),
    # and others the installed transformers routes through its attention interface, cheap to build
    "starcoder2": (_decoder(tf.Starcoder2Config, tf.Starcoder2ForCausalLM, sliding_window=8), "sdpa", "window"),
    "olmo3": (_decoder(tf.Olmo3Config, tf.Olmo3ForCausalLM, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"]), "sdpa", "window"),
    "exaone4": (_decoder(tf.Exaone4Config, tf.Exaone4ForCausalLM, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"]), "sdpa", "window"),
    "ministral": (_decoder(tf.MinistralConfig, tf.MinistralForCausalLM, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"]), "sdpa", "window"),
    "mixtral": (_decoder(tf.MixtralConfig, tf.MixtralForCausalLM, sliding_window=8, num_local_experts=4,
                         experts_implementation="eager"), "sdpa", "window"),
    "qwen2_moe": (_decoder(tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, num_experts=4, num_experts_per_tok=2,
                           experts_implementation="eager"), "sdpa", None),
    "vaultgemma": (_decoder(tf.VaultGemmaConfig, tf.VaultGemmaForCausalLM, sliding_window=8,
                            attn_logit_softcapping=0.5, initializer_range=0.3, query_pre_attn_scalar=8,
                            layer_types=["sliding_attention", "full_attention"]), "eager", "window"),
    "smollm3": (_decoder(tf.SmolLM3Config, tf.SmolLM3ForCausalLM), "sdpa", None),
    "granite": (_decoder(tf.GraniteConfig, tf.GraniteForCausalLM), "sdpa", None),
    "glm4": (_decoder(tf.Glm4Config, tf.Glm4ForCausalLM), "sdpa", None),
    "gpt_neox": (_decoder(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM), "sdpa", None),
    "phi": (_decoder(tf.PhiConfig, tf.PhiForCausalLM), "sdpa", None),
    "stablelm": (_decoder(tf.StableLmConfig, tf.StableLmForCausalLM), "sdpa", None),
    "bert": (_bert, "sdpa", None),
    "modernbert": (_modernbert, "sdpa", "window"),
}
ENCODERS = {"bert", "modernbert"}


def build(name, attn):
    torch.manual_seed(0)
    return FAMILIES[name][0](attn).to(torch.float64).eval()


def tokens(b, n, seed=1):
    return torch.randint(3, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def out_of(model, ids, **kw):
    with torch.no_grad():
        o = model(ids, **kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def own_out(model, ids, monkeypatch, **kw):
    """The model's own output; in float64 throughout: Gemma 2's eager attention casts its softmax to float32 (the
    cast is undone while an eager oracle runs, in float64 only; an sdpa oracle runs as it is: a mixture-of-experts
    router's own float32 softmax must stay as the foveal run has it)."""
    if model.config._attn_implementation != "eager":
        return out_of(model, ids, **kw)
    softmax = torch.nn.functional.softmax

    def float64_softmax(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "softmax", float64_softmax)
        return out_of(model, ids, **kw)


def padded_batch(name):
    """Three rows: a left-padded (decoders) or right-padded (encoders) one, a right-padded one, a full one."""
    am = torch.ones(3, N, dtype=torch.long)
    if name in ENCODERS:
        am[0, N - 3:] = 0
    else:
        am[0, :5] = 0
    am[1, N - 6:] = 0
    return tokens(3, N), am


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_dense_recipe_equals_the_models_own_attention_in_float64(name, monkeypatch):
    _, own, matters = FAMILIES[name]
    model = build(name, own)
    ids, am = padded_batch(name)
    real = am.bool()
    want = own_out(model, ids, monkeypatch, attention_mask=am)
    every = [m.layer_idx for m in fi.attention_layers(model)]
    assert len(every) == model.config.num_hidden_layers
    sparsify(model, recipes.dense(), layers=every)
    torch.testing.assert_close(out_of(model, ids, attention_mask=am)[real], want[real], **TOL)
    if matters == "window":  # the native windows are in force here: the pattern alone differs
        sparsify(model, recipes.dense(), layers=every, windows="replace")
        assert (out_of(model, ids, attention_mask=am) - want)[real].abs().max() > 1e-3
    restore(model)
    torch.testing.assert_close(own_out(model, ids, monkeypatch, attention_mask=am), want, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
def test_default_layers_leave_sliding_layers_to_the_model_and_still_equal_it(name, monkeypatch):
    """``layers=None``: the sliding layers are left as the model has them; where sdpa cannot express them (softcap,
    sinks) they run foveal's dense pattern in their window, and the whole equals the model's eager attention."""
    model = build(name, "eager")
    ids, am = padded_batch(name)
    want = own_out(model, ids, monkeypatch, attention_mask=am)
    sparsify(model, recipes.dense())
    torch.testing.assert_close(out_of(model, ids, attention_mask=am)[am.bool()], want[am.bool()], **TOL)


def _additive(mask):
    """A (n, n) bool mask as the (1, 1, n, n) float mask an eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)[None, None]


def test_gpt_oss_sparse_recipe_equals_its_eager_attention_under_the_same_masks(monkeypatch):
    """streaming_llm on both layers (the sliding one keeps its window of 8) against gpt-oss' own eager attention
    under the same masks, one per layer type; its sinks matter here (dropping them would be seen)."""
    import bruteforce as bf

    model = build("gpt_oss", "eager")
    ids = tokens(2, N)
    streaming = bf.sinks(N, 2) | bf.sliding_window(N, 4, 0, 1)
    masks = {"full_attention": _additive(streaming),
             "sliding_attention": _additive(streaming & bf.sliding_window(N, 7, 0, 1))}
    want = own_out(model, ids, monkeypatch, attention_mask=masks)
    sparsify(model, recipes.streaming_llm(sinks=2, window=5), layers=[0, 1])
    torch.testing.assert_close(out_of(model, ids), want, **TOL)
    restore(model)
    with torch.no_grad():
        for m in fi.attention_layers(model):
            m.sinks.fill_(-torch.inf)  # no sink: what dropping s_aux would compute
    assert (own_out(model, ids, monkeypatch, attention_mask=masks) - want).abs().max() > 1e-3


def test_gemma2_softcap_matters_in_this_configuration(monkeypatch):
    model = build("gemma2", "eager")
    ids, am = padded_batch("gemma2")
    want = own_out(model, ids, monkeypatch, attention_mask=am)
    for m in fi.attention_layers(model):
        m.attn_logit_softcapping = None  # what dropping softcap would compute
    assert (own_out(model, ids, monkeypatch, attention_mask=am) - want)[am.bool()].abs().max() > 1e-3


def test_gpt_oss_sink_gradients_and_cached_decoding_equal_its_eager_attention():
    """Training (no attention dropout): the gradient reaches the sink logits and equals eager's; one cached decoding
    step (the sliding layer's cache holds its window) equals the full forward."""
    ids = tokens(2, N)
    grads = []
    for foveal in (False, True):
        model = build("gpt_oss", "eager").train()
        if foveal:
            sparsify(model, recipes.dense(), layers=[0, 1])
        model(ids).logits.square().mean().backward()  # gpt-oss' eager softmax keeps float64
        grads.append(torch.stack([a.sinks.grad for a in fi.attention_layers(model)]))
    assert grads[0].abs().min() > 0
    torch.testing.assert_close(grads[1], grads[0], **TOL)
    model.eval()
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        pre = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=pre.cache).logits[:, -1]
    torch.testing.assert_close(step, full, **TOL)


@pytest.mark.parametrize("windows", ["keep", "replace"])
def test_modernbert_sparse_recipe_equals_its_sdpa_under_the_same_masks(windows):
    """ModernBERT's local layers (|i - j| <= 4 here) keep their window under a recipe, or the recipe replaces it;
    its own sdpa under the same masks, one per layer type, is the oracle."""
    import bruteforce as bf

    model = build("modernbert", "sdpa")
    ids = tokens(2, N)
    recipe = bf.sliding_window(N, 2, 3, 1) | bf.global_tokens(N, 2)  # streaming_llm(2, 6)'s encoder form
    local = recipe & bf.sliding_window(N, 4, 4, 1) if windows == "keep" else recipe
    want = out_of(model, ids, attention_mask={"full_attention": recipe[None, None],
                                              "sliding_attention": local[None, None]})
    sparsify(model, recipes.streaming_llm(sinks=2, window=6), layers=[0, 1, 2], windows=windows)
    torch.testing.assert_close(out_of(model, ids), want, **TOL)


def test_default_layers_are_those_without_a_native_window_and_a_model_without_one_is_refused():
    seen = set()
    model = build("modernbert", "sdpa")  # layer 0 global, layers 1 and 2 local
    sparsify(model, recipes.dense(), observe=lambda layer, pattern, q, k: seen.add(layer))
    out_of(model, tokens(1, N))
    assert seen == {0}
    with pytest.raises(ValueError, match=r"every attention layer of MistralForCausalLM has a native sliding window "
                                         r"\(sliding_window=8\).* name the layers, e.g. layers=\[0, 1\]"):
        sparsify(build("mistral", "sdpa"), recipes.dense())
