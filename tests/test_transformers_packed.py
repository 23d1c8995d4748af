"""Packed batches (one row holding several sequences, positions restarting: transformers' DataCollatorWithFlattening,
with or without its FlashAttention keywords): each sequence attends within itself, exactly as when the model runs on
it alone (float64), as flash_attention_2 does; never across sequences. Decoding after a packed prefill is refused."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import foveal.integrations.transformers as fi  # noqa: E402
from foveal import recipes  # noqa: E402
from foveal.integrations.transformers import restore, sparsify  # noqa: E402
from test_transformers_families import build, out_of  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = (9, 13, 8)
TOL = dict(atol=1e-10, rtol=1e-10)


def packed(flash_kwargs: bool):
    """DataCollatorWithFlattening's batch of three sequences: (batch without labels, the sequences)."""
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 97, (n,), generator=g) for n in LENGTHS]
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(
        [{"input_ids": s.tolist()} for s in seqs])
    batch.pop("labels")
    return batch, seqs


def alone(model, seqs):
    return torch.cat([out_of(model, s[None])[0] for s in seqs])


@pytest.mark.parametrize("name, recipe, layers", [
    ("llama", recipes.dense(), None),
    ("llama", recipes.streaming_llm(sinks=2, window=4), None),  # each sequence's sinks are its own first tokens
    ("mistral", recipes.dense(), [0, 1]),  # its native window, per sequence
    ("gpt_oss", recipes.dense(), None),  # the sliding layer left to the model runs on foveal (its sinks)
], ids=["llama-dense", "llama-streaming", "mistral-window", "gpt_oss"])
@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_a_packed_row_attends_within_each_sequence_as_each_alone(name, recipe, layers, flash_kwargs, use_cache):
    model = build(name, "eager" if name == "gpt_oss" else "sdpa")
    batch, seqs = packed(flash_kwargs)
    sparsify(model, recipe, layers=layers)
    got = out_of(model, batch.pop("input_ids"), use_cache=use_cache, **batch)[0]
    torch.testing.assert_close(got, alone(model, seqs), **TOL)
    if isinstance(recipe, type(recipes.dense())):  # and the model's own attention on each sequence alone
        restore(model)
        torch.testing.assert_close(got, alone(model, seqs), **TOL)


def test_decoding_after_a_packed_row_is_refused_and_padding_with_cu_seq_lens_too():
    model = build("llama", "sdpa")
    batch, _ = packed(True)
    sparsify(model, recipes.dense())
    ids = batch.pop("input_ids")
    flash = {k: v for k, v in batch.items() if k != "position_ids"}
    with pytest.raises(ValueError, match="cu_seq_lens_q=.* must run from 0 to the 20 tokens of one packed row"):
        out_of(model, ids[:, :20], use_cache=False, **flash)
    with torch.no_grad():
        pre = model(ids, position_ids=batch["position_ids"], use_cache=True)
        with pytest.raises(ValueError, match="position_ids start at 8 but the cache holds 30 tokens"):
            model(ids[:, -1:], cache=pre.cache, position_ids=torch.tensor([[8]]))
    with pytest.raises(ValueError, match="packed sequences .* at prefill only, without padding"):
        am = torch.ones_like(ids)
        am[0, :2] = 0
        out_of(model, ids, attention_mask=am, **batch)
    bad = {**batch, "cu_seq_lens_k": batch["cu_seq_lens_k"] + 0}
    bad["cu_seq_lens_k"][1] += 1
    with pytest.raises(ValueError, match="cu_seq_lens_k=.* cu_seq_lens_q and cu_seq_lens_k must be given and equal"):
        out_of(model, ids, **bad)
    with pytest.raises(ValueError, match="max_length_q=5; it must be the longest packed sequence, 13"):
        out_of(model, ids, **{**batch, "max_length_q": 5})
    assert fi.is_sparsified(model)
