"""Learned sink logits (gpt-oss ``s_aux``): against a brute-force softmax with one extra zero-value key.

The oracle is written here from the definition, in float64: the scores of the allowed
keys (scale, cap, term, mask, padding) with one more column holding the head's sink
logit, a softmax over the row, and values with one more zero row. Every backend,
forward and backward (the gradient of the sink included), padding, softcap, a score
term, GQA, per-head and content-selected patterns, decoding, ``merge_attentions``.
"""

import pytest
import torch

from foveal import Causal, Full, Neighborhood, PerHead, SlidingWindow, Sinks, attend, merge_attentions
from foveal.bias import ALiBi
from foveal.decode import KVCache, Quest, attend_decode
from foveal.kernels.select import Call, why_not
from foveal.patterns.dynamic import BlockTopK

from bruteforce import causal as bf_causal


def brute(q, k, v, mask, sinks, scale, *, pad=None, softcap=None, bias=None):
    """(out, lse) of softmax over the allowed keys plus one sink key per head (value 0), float64."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.double()
    allowed = mask.expand(s.shape)
    if pad is not None:
        allowed = allowed & ~pad[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    sink = sinks.double()[None, :, None, None].expand(*s.shape[:3], 1)
    full = torch.cat([s, sink], -1)
    lse = torch.logsumexp(full, -1)
    p = torch.exp(full - lse[..., None])[..., :-1]
    return p @ v, lse


def _inputs(b=2, hq=4, hkv=2, n=24, d=8, dtype=torch.float64, grad=True):
    q = torch.randn(b, hq, n, d, dtype=dtype)
    k = torch.randn(b, hkv, n, d, dtype=dtype)
    v = torch.randn(b, hkv, n, d, dtype=dtype)
    sinks = torch.randn(hq, dtype=dtype) * 2
    for t in (q, k, v, sinks):
        t.requires_grad_(grad)
    return q, k, v, sinks


def _grads(out, lse, tensors):
    torch.manual_seed(1)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    return torch.autograd.grad((out * go).sum() + (lse * gl).sum(), tensors)


CASES = {
    "causal": (Causal(24), lambda: bf_causal(24)),
    "window|sinks": (SlidingWindow(24, left=5) | Sinks(24, 2), None),
    "neighborhood": (Neighborhood((4, 6), kernel_size=3), None),
    "full": (Full(24), lambda: torch.ones(24, 24, dtype=torch.bool)),
}


@pytest.mark.parametrize("backend", ["reference", "sdpa", "cpu", "blocksparse"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_backend_matches_the_brute_force_forward_and_backward(backend, case):
    pattern, _ = CASES[case]
    q, k, v, sinks = _inputs()
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[1, 17:] = True
    call = Call(q, k, v, pattern, 8 ** -0.5, need_lse=True, key_padding_mask=pad)
    if why_not(call, backend):
        pytest.skip(f"{backend} does not run {case}: {why_not(call, backend)}")
    out, lse = attend(q, k, v, pattern, key_padding_mask=pad, sink_logits=sinks, backend=backend, return_lse=True)
    ref_out, ref_lse = brute(q, k, v, pattern.dense_mask(), sinks, 8 ** -0.5, pad=pad)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    for got, want in zip(_grads(out, lse, (q, k, v, sinks)), _grads(ref_out, ref_lse, (q, k, v, sinks))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_softcap_score_term_and_gqa_together():
    q, k, v, sinks = _inputs(hq=6, hkv=2)
    bias = ALiBi(6)
    h = torch.arange(6)[:, None, None]
    i = torch.arange(24)[None, :, None]
    j = torch.arange(24)[None, None, :]
    pattern = SlidingWindow(24, left=6, right=2)
    for backend in ("reference", "cpu", "blocksparse"):
        out, lse = attend(q, k, v, pattern, softcap=2.0, bias=bias, sink_logits=sinks, backend=backend,
                          return_lse=True)
        ref_out, ref_lse = brute(q, k, v, pattern.dense_mask(), sinks, 8 ** -0.5, softcap=2.0, bias=bias(h, i, j))
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
        for got, want in zip(_grads(out, lse, (q, k, v, sinks)), _grads(ref_out, ref_lse, (q, k, v, sinks))):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_a_row_with_no_key_gets_zero_output_and_the_sink_as_lse():
    q, k, v, sinks = _inputs(b=1)
    pad = torch.ones(1, 24, dtype=torch.bool)  # every key is padding
    for backend in ("reference", "sdpa", "cpu", "blocksparse"):
        out, lse = attend(q, k, v, Causal(24), key_padding_mask=pad, sink_logits=sinks, backend=backend,
                          return_lse=True)
        assert torch.equal(out, torch.zeros_like(out))
        torch.testing.assert_close(lse, sinks.detach()[None, :, None].expand_as(lse), rtol=0, atol=0)
        (gs,) = torch.autograd.grad(lse.sum() + out.sum(), sinks)
        assert torch.isfinite(gs).all()


def test_a_sink_of_minus_infinity_changes_nothing():
    q, k, v, _ = _inputs()
    none = torch.full((4,), float("-inf"), dtype=torch.float64)
    out, lse = attend(q, k, v, Causal(24), sink_logits=none, return_lse=True)
    ref_out, ref_lse = attend(q, k, v, Causal(24), return_lse=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_per_head_and_content_selected_patterns():
    q, k, v, sinks = _inputs()
    parts = [Causal(24), SlidingWindow(24, left=3), Causal(24), SlidingWindow(24, left=3) | Sinks(24, 2)]
    heads = PerHead(parts)
    mask = torch.stack([p.dense_mask() for p in parts])[None]
    out, lse = attend(q, k, v, heads, sink_logits=sinks, return_lse=True)
    ref_out, ref_lse = brute(q, k, v, mask, sinks, 8 ** -0.5)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)

    topk = BlockTopK(24, 2, block=8)
    sel = topk.select(q, k)
    out, lse = attend(q, k, v, sel, sink_logits=sinks, return_lse=True)
    ref_out, ref_lse = brute(q, k, v, sel.dense_mask(), sinks, 8 ** -0.5)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for got, want in zip(_grads(out, lse, (q, k, v, sinks)), _grads(ref_out, ref_lse, (q, k, v, sinks))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_inputs(dtype):
    q, k, v, sinks = _inputs(dtype=dtype, grad=False)
    out, lse = attend(q, k, v, Causal(24), sink_logits=sinks, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = brute(q, k, v, bf_causal(24), sinks, 8 ** -0.5)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # a bf16 output rounds to 8 bits of mantissa
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    # the lse of half inputs: float32 accumulation of scores rounded from bf16 products (the backends' own rule)
    lse_tol = 1e-4 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(lse.double(), ref_lse, rtol=lse_tol, atol=lse_tol)


def test_merge_attentions_adds_the_sink_once():
    q, k, v, sinks = _inputs()
    first = attend(q, k[:, :, :10], v[:, :, :10], Full(24, n_kv=10), return_lse=True)
    second = attend(q, k[:, :, 10:], v[:, :, 10:], Full(24, n_kv=14), return_lse=True)
    out, lse = merge_attentions([first[0], second[0]], [first[1], second[1]], sink_logits=sinks)
    ref_out, ref_lse = brute(q, k, v, torch.ones(24, 24, dtype=torch.bool), sinks, 8 ** -0.5)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_decoding_with_sinks_matches_the_full_prefix():
    torch.manual_seed(3)
    b, hq, hkv, d, n = 2, 4, 2, 8, 20
    k = torch.randn(b, hkv, n, d, dtype=torch.float64)
    v = torch.randn(b, hkv, n, d, dtype=torch.float64)
    q = torch.randn(b, hq, 1, d, dtype=torch.float64)
    sinks = torch.randn(hq, dtype=torch.float64)
    for pattern, select in ((None, None), (SlidingWindow(64, left=6), None), (None, Quest(page_size=4, token_budget=8))):
        cache = KVCache(b, hkv, d, dtype=torch.float64, pattern=pattern)
        cache.append(k, v)
        out, lse, kept = attend_decode(q, cache, select=select, sink_logits=sinks, return_lse=True, return_kept=True)
        if select is None:
            allowed = torch.ones(1, n, dtype=torch.bool) if pattern is None else \
                pattern.dense_mask()[n - 1 : n, :n]
            ref_out, ref_lse = brute(q, k, v, allowed, sinks, d ** -0.5)
        else:  # the keys Quest kept, per (batch, head): compare with attend over the same keys, sink included
            ref_out, ref_lse = attend_decode(q, cache, select=select, return_lse=True)
            ref_lse_s = torch.logaddexp(ref_lse, sinks[None, :, None])
            ref_out = ref_out * torch.exp(ref_lse - ref_lse_s)[..., None]
            ref_lse = ref_lse_s
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_bad_sink_logits_are_refused_before_any_work():
    q, k, v, _ = _inputs(grad=False)
    with pytest.raises(ValueError, match=r"sink_logits must have shape \(query_heads,\) = \(4,\)"):
        attend(q, k, v, Causal(24), sink_logits=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="sink_logits must be a floating tensor"):
        attend(q, k, v, Causal(24), sink_logits=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="sink_logits must be None or a float tensor"):
        attend(q, k, v, Causal(24), sink_logits=[0.0] * 4)
