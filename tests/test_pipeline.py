"""The one attend pipeline: every backend against an independent dense oracle, with key padding, soft-cap,
score terms and per-head patterns, forward and backward; validation, caches, merges and the lse rule."""

import math
import random
import re

import pytest
import torch

import foveal
from foveal import (
    BlockTopK,
    Causal,
    Dilated,
    Full,
    Grid,
    Neighborhood,
    Ordered,
    PerHead,
    RelativePositionBias,
    SlidingWindow,
    VerticalSlash,
    Window,
    attend,
    merge_attentions,
)
from foveal.kernels.select import AUTO_ORDER, BACKENDS, Call, select

EAGER = ("reference", "cpu", "blocksparse")


# -- an oracle written here, in float64 ---------------------------------------------------------
def dense(q, k, v, mask, scale=None, softcap=None, term=None, padding=None):
    """Plain masked softmax attention: mask broadcastable to (B, Hq, Nq, Nk); (out, lse) in float64."""
    b, hq, nq, d = q.shape
    g = hq // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) * (d**-0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if term is not None:
        s = s + term.double()
    allowed = mask.expand(b, hq, nq, k.shape[2]).clone()
    if padding is not None:
        allowed &= ~padding[:, None, None, :]
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return p @ vv, lse


class TableBias:
    """A learned score term per (head, query, key): gradients reach ``table`` through ``parameters()``."""

    def __init__(self, table):
        self.table = table

    def __call__(self, h, i, j):
        return self.table[h, i, j]

    def parameters(self):
        return [self.table]


def _qkv(b, hq, hkv, nq, nk, d=8, dv=None, dtype=torch.float32, grad=True):
    def t(h, n, e):
        return torch.randn(b, h, n, e, dtype=dtype).requires_grad_(grad)

    return t(hq, nq, d), t(hkv, nk, d), t(hkv, nk, dv or d)


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad((out * g).sum(), inputs)


def _assert_float64_exact(out, lse, want, want_lse, inputs):
    """out and lse equal the oracle's to float64 rounding (empty rows: lse -inf on both), and so do the
    gradients of out and of the finite lse entries."""
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=1e-12, rtol=1e-12)
    g = torch.randn(lse.shape, dtype=torch.float64).masked_fill(~finite, 0.0)
    for a, w in zip(torch.autograd.grad(out.sum() + (lse.masked_fill(~finite, 0) * g).sum(), inputs),
                    torch.autograd.grad(want.sum() + (want_lse.masked_fill(~finite, 0) * g).sum(), inputs)):
        torch.testing.assert_close(a, w, atol=1e-11, rtol=1e-11)


def _padding(b, n, rng):
    """Right padding of random lengths (one batch element fully padded when b > 2)."""
    lengths = [rng.randint(1, n) for _ in range(b)]
    if b > 2:
        lengths[-1] = 0
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


CASES = [  # (pattern, n_q, n_kv)
    (Causal(37), 37, 37),
    (Causal(9, n_kv=23), 9, 23),
    (SlidingWindow(45, left=7) | foveal.Sinks(45, 3), 45, 45),
    (Neighborhood((7, 9), kernel_size=3, dilation=2), 63, 63),
    (Window((6, 8), (3, 4), shift=(1, 2)), 48, 48),
    (Dilated(40, segment=(8, 16), rate=(1, 2)), 40, 40),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("backend", EAGER)
def test_every_eager_backend_with_padding_softcap_and_bias_forward_and_backward(case, backend):
    pattern, nq, nk = CASES[case]
    rng = random.Random(case)
    torch.manual_seed(case)
    b, hkv, g = 3, 2, 2
    q, k, v = _qkv(b, hkv * g, hkv, nq, nk, d=8, dv=6)
    pad = _padding(b, nk, rng)
    table = (0.3 * torch.randn(hkv * g, nq, nk)).requires_grad_()
    term = TableBias(table)

    out, lse = attend(q, k, v, pattern, key_padding_mask=pad, softcap=2.5, bias=term, backend=backend,
                      return_lse=True)
    want, want_lse = dense(q, k, v, pattern.dense_mask(), softcap=2.5, term=table, padding=pad)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.double()[finite], want_lse[finite], atol=2e-5, rtol=1e-4)
    assert (out[-1] == 0).all() and (lse[-1] == -math.inf).all()  # the fully padded sequence
    for a, w in zip(_grads(out, (q, k, v, table)), _grads(want, (q, k, v, table))):
        torch.testing.assert_close(a.double(), w.double(), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", EAGER)
def test_float64_is_float64_exact_and_lse_follows_the_rule(backend):
    torch.manual_seed(1)
    q, k, v = _qkv(2, 4, 2, 30, 30, dtype=torch.float64)
    pad = _padding(2, 30, random.Random(1))
    out, lse = attend(q, k, v, SlidingWindow(30, left=5), key_padding_mask=pad, softcap=3.0, backend=backend,
                      return_lse=True)
    assert out.dtype == lse.dtype == torch.float64
    want, want_lse = dense(q, k, v, SlidingWindow(30, left=5).dense_mask(), softcap=3.0, padding=pad)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    for a, w in zip(_grads(out, (q, k, v)), _grads(want, (q, k, v))):
        torch.testing.assert_close(a, w, atol=1e-11, rtol=1e-11)
    for dtype in (torch.float32, torch.bfloat16):
        _, lse = attend(q.detach().to(dtype), k.detach().to(dtype), v.detach().to(dtype), Causal(30),
                        backend=backend, return_lse=True)
        assert lse.dtype == torch.float32


@pytest.mark.parametrize("backend", EAGER)
def test_bfloat16_with_padding_and_softcap(backend):
    torch.manual_seed(2)
    q, k, v = _qkv(2, 2, 1, 40, 40, dtype=torch.bfloat16)
    pad = _padding(2, 40, random.Random(2))
    out = attend(q, k, v, Causal(40), key_padding_mask=pad, softcap=1.5, backend=backend)
    want, _ = dense(q, k, v, Causal(40).dense_mask(), softcap=1.5, padding=pad)
    assert out.dtype == torch.bfloat16
    assert (out.double() - want).abs().max() < 3e-2
    ga, gw = _grads(out, (q, k, v)), _grads(want, (q, k, v))
    for a, w in zip(ga, gw):
        assert a.dtype == torch.bfloat16 and (a.double() - w).abs().max() < 5e-2 * (1 + w.abs().max())


def test_a_padded_batch_gives_each_sequence_what_it_gets_alone():
    torch.manual_seed(3)
    n, lengths = 33, [33, 20, 7]
    q, k, v = _qkv(3, 4, 2, n, n, dtype=torch.float64, grad=False)  # float64: padding changes the blocking
    pad = torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]
    for backend in EAGER:
        out = attend(q, k, v, Causal(n) & SlidingWindow(n, left=9), key_padding_mask=pad, backend=backend)
        for b, m in enumerate(lengths):
            alone = attend(q[b : b + 1, :, :m], k[b : b + 1, :, :m], v[b : b + 1, :, :m],
                           Causal(m) & SlidingWindow(m, left=9), backend=backend)
            torch.testing.assert_close(out[b : b + 1, :, :m], alone, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", EAGER)
def test_per_head_patterns_with_gqa_equal_a_loop_over_heads(backend):
    torch.manual_seed(4)
    n = 36
    parts = [Causal(n), SlidingWindow(n, left=4), Causal(n), Full(n), SlidingWindow(n, left=4),
             SlidingWindow(n, left=4), Causal(n) & SlidingWindow(n, left=10), Full(n)]
    q, k, v = _qkv(2, 8, 4, n, n)
    pad = _padding(2, n, random.Random(4))
    rel = RelativePositionBias(n, n - 1, table=(0.2 * torch.randn(8, 2 * n - 1)).requires_grad_())
    out, lse = attend(q, k, v, PerHead(parts), key_padding_mask=pad, bias=rel, backend=backend, return_lse=True)
    h = torch.arange(8)[:, None, None]
    term = rel(h, torch.arange(n)[None, :, None], torch.arange(n)[None, None, :])
    mask = torch.stack([p.dense_mask() for p in parts])[None]
    want, want_lse = dense(q, k, v, mask, term=term, padding=pad)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.double()[finite], want_lse[finite], atol=2e-5, rtol=1e-4)
    for a, w in zip(_grads(out, (q, k, v, rel.table)), _grads(want, (q, k, v, rel.table))):
        torch.testing.assert_close(a.double(), w.double(), atol=5e-5, rtol=1e-4)


def test_per_head_with_content_selected_and_ordered_parts():
    torch.manual_seed(5)
    n = 64
    grid = (8, 8)
    q, k, v = _qkv(1, 4, 2, n, n)
    parts = [BlockTopK(n, topk=2, block=16), Grid(grid, 4), Ordered(SlidingWindow(n, left=5), "hilbert", grid),
             BlockTopK(n, topk=2, block=16)]
    out = attend(q, k, v, PerHead(parts))
    for h, p in enumerate(parts):  # each head alone, on the reference (a selection made on that head alone)
        alone = attend(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1], p, backend="reference")
        torch.testing.assert_close(out[:, h : h + 1], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="PerHead pattern has 4 parts but q has 2 query heads"):
        attend(q[:, :2], k[:, :1], v[:, :1], PerHead(parts))


def test_content_selected_patterns_take_padding_softcap_and_bias():
    torch.manual_seed(6)
    n = 96
    q, k, v = _qkv(2, 4, 2, n, n)
    pad = _padding(2, n, random.Random(6))
    sel = VerticalSlash(n, vertical=8, slash=8, block=32, last_q=16).select(q, k)
    mask = sel.dense_mask()

    def term(h, i, j):
        return 0.05 * (h + 1) * torch.cos(0.1 * (i - j))

    h = torch.arange(4)[:, None, None]
    want, _ = dense(q, k, v, mask, softcap=4.0, term=term(h, torch.arange(n)[None, :, None],
                                                         torch.arange(n)[None, None, :]), padding=pad)
    want_grads = _grads(want, (q, k, v))
    for backend in ("reference", "blocksparse"):
        out = attend(q, k, v, sel, key_padding_mask=pad, softcap=4.0, bias=term, backend=backend)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
        for a, w in zip(_grads(out, (q, k, v)), want_grads):
            torch.testing.assert_close(a.double(), w.double(), atol=5e-5, rtol=1e-4)


def test_flex_forward_on_cpu_with_padding_and_softcap():
    torch.manual_seed(7)
    q, k, v = _qkv(2, 2, 2, 64, 64, grad=False)
    pad = torch.arange(64)[None, :] >= torch.tensor([64, 50])[:, None]
    with torch.no_grad():
        out = attend(q, k, v, SlidingWindow(64, left=8), key_padding_mask=pad, softcap=2.0, backend="flex")
    want, _ = dense(q, k, v, SlidingWindow(64, left=8).dense_mask(), softcap=2.0, padding=pad)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-4)


# -- dispatch -----------------------------------------------------------------------------------
def test_auto_chooses_among_every_backend_and_names_why_not():
    assert set(BACKENDS) >= {"reference", "sdpa", "cpu", "blocksparse", "flex"}
    assert "blocksparse" in AUTO_ORDER["cpu"]
    q, k, v = _qkv(1, 2, 1, 64, 64, grad=False)
    sel = BlockTopK(64, topk=2, block=16).select(q, k)
    from foveal.kernels import native

    # content selections: the native kernel where it is built (measured faster), else the eager blocksparse
    assert select(Call(q, k, v, sel, 0.1), "auto").name == ("native" if native.available() else "blocksparse")
    assert select(Call(q, k, v, Causal(64), 0.1), "auto").name == "sdpa"
    qb, kb, vb = _qkv(1, 2, 1, 1024, 1024, grad=False)
    # a narrow window fills few of native's 64x64 tiles: the gather kernel
    assert select(Call(qb, kb, vb, SlidingWindow(1024, left=8), 0.1), "auto").name == "cpu"
    assert select(Call(q, k, v, SlidingWindow(64, left=8), 0.1), "auto").name == "sdpa"  # small: one fused call
    with pytest.raises(ValueError, match="backend 'cpu' cannot run this call: cpu runs static patterns"):
        attend(q, k, v, sel, backend="cpu")
    with pytest.raises(ValueError, match="backend 'flex' cannot run this call: .*inference only"):
        attend(q.requires_grad_(), k, v, Causal(64), backend="flex")
    from foveal.nn._common import check_backend

    assert check_backend("blocksparse") == "blocksparse"


# -- validation, before any work ----------------------------------------------------------------
def test_batch_zero_works_as_in_sdpa_and_zero_heads_or_dims_are_refused():
    q, k, v = _qkv(0, 4, 2, 16, 16)
    out, lse = attend(q, k, v, Causal(16), return_lse=True)
    assert out.shape == (0, 4, 16, 8) and lse.shape == (0, 4, 16)
    assert torch.autograd.grad(out.sum(), q)[0].shape == q.shape
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert sdpa.shape == out.shape
    with pytest.raises(ValueError, match="at least one head, got 0 query and 0 key/value heads"):
        attend(*_qkv(1, 0, 0, 16, 16), Causal(16))
    with pytest.raises(ValueError, match="head_dim must be >= 1, got 0"):
        attend(*_qkv(1, 2, 2, 16, 16, d=0), Causal(16))


def test_bad_terms_padding_and_softcap_are_refused_before_any_work():
    q, k, v = _qkv(2, 4, 2, 16, 16, grad=False)
    with pytest.raises(ValueError, match="is for 2 heads but q has 4 query heads"):
        attend(q, k, v, Causal(16), bias=RelativePositionBias(16, 15, heads=2))
    table = torch.zeros(2, 16, 16)
    with pytest.raises(ValueError, match="cannot be evaluated for 4 query heads"):
        attend(q, k, v, Causal(16), bias=lambda h, i, j: table[h, i, j])
    with pytest.raises(ValueError, match="is for 8 heads but q has 4 query heads"):
        attend(q, k, v, Causal(16), bias=foveal.ALiBi(8))
    with pytest.raises(TypeError, match="bias must return a floating tensor, got torch.int64"):
        attend(q, k, v, Causal(16), bias=lambda h, i, j: i - j)
    with pytest.raises(ValueError, match="must broadcast to \\(heads, queries, keys\\)"):
        attend(q, k, v, Causal(16), bias=lambda h, i, j: torch.zeros(3, 5, 1, 1))
    # a result that broadcasts with the index tensors but to a larger shape than the pairs asked for
    for bad in (torch.zeros(5), torch.zeros(1, 1, 5), torch.zeros(4, 3, 1)):
        for backend in ("auto", "reference", "sdpa", "cpu", "blocksparse"):
            with pytest.raises(ValueError, match=rf"bias\(h, q_idx, kv_idx\).*returned shape "
                                                 rf"{re.escape(str(tuple(bad.shape)))}.*expected \(4, 1, 1\)"):
                attend(q, k, v, Causal(16), bias=lambda h, i, j, bad=bad: bad, backend=backend)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        attend(q, k, v, Causal(16), key_padding_mask=torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, n_kv\) = \(2, 16\), got \(16,\)"):
        attend(q, k, v, Causal(16), key_padding_mask=torch.zeros(16, dtype=torch.bool))
    with pytest.raises(ValueError, match="softcap must be a positive finite number or None"):
        attend(q, k, v, Causal(16), softcap=0.0)
    with pytest.raises(TypeError, match="softcap must be a number or None"):
        attend(q, k, v, Causal(16), softcap="30")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        attend(q, k, v, BlockTopK(16, topk=1, block=8), backend="nope")


# -- caches belong to the backends, keyed by value, bounded -------------------------------------
def test_caches_are_keyed_by_value_bounded_and_kept_off_the_pattern():
    from foveal.kernels.cpu import PLANS

    q, k, v = _qkv(1, 2, 2, 50, 50, grad=False)
    foveal.cache.clear_caches()
    attend(q, k, v, SlidingWindow(50, left=6), backend="cpu")
    misses = PLANS.misses
    p = SlidingWindow(50, left=6)  # built anew: equal value, the same plan
    attend(q, k, v, p, backend="cpu")
    assert PLANS.misses == misses and PLANS.hits >= 1
    assert not any("plan" in key or "flex" in key for key in p.__dict__)
    for left in range(PLANS.maxsize + 5):
        attend(q[:, :, :20], k[:, :, :20], v[:, :, :20], SlidingWindow(20, left=left % 20, right=left // 20),
               backend="cpu")
    assert len(PLANS) <= PLANS.maxsize


# -- merges ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_attentions_equals_one_softmax_over_the_union(dtype):
    torch.manual_seed(8)
    n = 40
    q, k, v = _qkv(2, 4, 2, n, n, dtype=dtype, grad=False)
    pattern = Causal(n) & SlidingWindow(n, left=12)
    mask = pattern.dense_mask()
    cut = torch.arange(n)[None, :] < 17  # keys split into two disjoint sets
    outs, lses = [], []
    for part in (cut, ~cut):
        o, l = dense(q, k, v, mask & part)
        outs.append(o.to(dtype))
        lses.append(l.to(dtype))
    out, lse = merge_attentions(outs, lses)
    want, want_lse = dense(q, k, v, mask)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)
    empty = torch.full_like(lses[0], -math.inf)
    o, l = merge_attentions([outs[0] * 0, outs[1] * 0], [empty, empty])
    assert (o == 0).all() and (l == -math.inf).all() and not o.isnan().any()
    with pytest.raises(ValueError, match="as many outputs as lses"):
        merge_attentions(outs, lses[:1])


# -- the sdpa backend: Full and Causal on the fused kernel ---------------------------------------
@pytest.mark.parametrize("pattern", [Full(33), Full(9, n_kv=40), Causal(37), Causal(11, n_kv=40), Causal(1, n_kv=25)])
def test_sdpa_runs_full_and_bottom_right_causal_exactly_with_lse(pattern):
    torch.manual_seed(9)
    q, k, v = _qkv(2, 6, 3, pattern.n_q, pattern.n_kv, d=8, dtype=torch.float64)
    out, lse = attend(q, k, v, pattern, backend="sdpa", return_lse=True)
    want, want_lse = dense(q, k, v, pattern.dense_mask())
    assert lse.dtype == torch.float64
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
    g = torch.randn(lse.shape, dtype=torch.float64)
    for a, w in zip(torch.autograd.grad((out * 0.5).sum() + (lse * g).sum(), (q, k, v)),
                    torch.autograd.grad((want * 0.5).sum() + (want_lse * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, w, atol=1e-11, rtol=1e-11)
    b = [t.detach().bfloat16() for t in (q, k, v)]
    out, lse = attend(*b, pattern, backend="sdpa", return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert (out.double() - want).abs().max() < 3e-2


def test_sdpa_says_why_not():
    q, k, v = _qkv(1, 2, 1, 16, 16, grad=False)
    qb, kb, vb = _qkv(1, 2, 1, 1024, 1024, grad=False)
    for kwargs, reason in (({"softcap": 5.0}, "soft-cap"), ({"bias": foveal.ALiBi(2)}, "score term only on CPU")):
        with pytest.raises(ValueError, match=f"backend 'sdpa' cannot run this call: .*{reason}"):
            attend(qb, kb, vb, Causal(1024), backend="sdpa", **kwargs)
        attend(qb, kb, vb, Causal(1024), **kwargs)  # auto goes elsewhere
    with pytest.raises(ValueError, match="sdpa runs only patterns that need no mask"):
        attend(qb, kb, vb, SlidingWindow(1024, left=3), backend="sdpa")
    with pytest.raises(ValueError, match="sdpa runs only patterns that need no mask"):
        attend(q, k, v, BlockTopK(16, topk=1, block=8), backend="sdpa")
    with pytest.raises(ValueError, match="needs v to have q's head_dim"):
        attend(q, k, v[..., :4], Causal(16), backend="sdpa")


def test_small_patterns_run_on_sdpa_under_their_mask_exactly():
    from foveal.kernels.sdpa import SMALL_PAIRS

    torch.manual_seed(10)
    for pattern in (Neighborhood((9, 11), 3), SlidingWindow(30, left=4, n_kv=45), Causal(20, n_kv=12),
                    Window((6, 8), (3, 4))):
        assert pattern.n_q * pattern.n_kv <= SMALL_PAIRS
        q, k, v = _qkv(2, 4, 2, pattern.n_q, pattern.n_kv, dtype=torch.float64)
        assert select(Call(q, k, v, pattern, 0.3), "auto").name == "sdpa"
        out, lse = attend(q, k, v, pattern, backend="sdpa", return_lse=True)
        want, want_lse = dense(q, k, v, pattern.dense_mask())
        _assert_float64_exact(out, lse, want, want_lse, (q, k, v))  # Causal(20, n_kv=12): 8 rows see nothing
    big = Neighborhood((32, 32), 7)
    q, k, v = _qkv(1, 2, 2, big.n, big.n, grad=False)
    from foveal.kernels import native

    # above the small size: the native neighbourhood kernel where it is built, else the eager gather kernel
    assert select(Call(q, k, v, big, 0.3), "auto").name == ("native-na" if native.available() else "cpu")


@pytest.mark.parametrize("pattern", [Window((6, 8), (3, 4)), Neighborhood((7, 9), 3), Causal(20), Full(12, n_kv=18)])
def test_small_patterns_take_a_learned_score_term_on_sdpa_exactly(pattern):
    torch.manual_seed(12)
    b, hq = 3, 4
    q, k, v = _qkv(b, hq, 2, pattern.n_q, pattern.n_kv, dtype=torch.float64)
    table = torch.randn(hq, pattern.n_q, pattern.n_kv, dtype=torch.float64, requires_grad=True)
    term = TableBias(table)
    pad = torch.zeros(b, pattern.n_kv, dtype=torch.bool)
    pad[1, pattern.n_kv // 2 :] = True
    pad[2] = True  # a sequence with no key: 0 and lse -inf
    assert select(Call(q, k, v, pattern, 0.3, bias=term), "auto").name == "sdpa"
    out, lse = attend(q, k, v, pattern, bias=term, key_padding_mask=pad, backend="sdpa", return_lse=True)
    want, want_lse = dense(q, k, v, pattern.dense_mask(), term=table, padding=pad)
    _assert_float64_exact(out, lse, want, want_lse, (q, k, v, table))
    if isinstance(pattern, Window):  # the library's own table (Swin's), through its parameters
        rel = RelativePositionBias((6, 8), (2, 3), torch.randn(hq, 5, 7, dtype=torch.float64, requires_grad=True))
        out = attend(q, k, v, pattern, bias=rel, backend="sdpa")
        ref = attend(q, k, v, pattern, bias=rel, backend="reference")
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        (ga,), (gw,) = torch.autograd.grad(out.sum(), [rel.table]), torch.autograd.grad(ref.sum(), [rel.table])
        torch.testing.assert_close(ga, gw, atol=1e-11, rtol=1e-11)


def test_a_selection_made_by_hand_is_checked_before_any_backend():
    from foveal.patterns.dynamic import BlockSelection

    q, k, v = _qkv(1, 1, 1, 32, 32, grad=False)

    def sel(blocks, tokens=None):
        kv = torch.tensor(blocks).view(1, 1, 2, -1)
        return BlockSelection(32, 16, kv, None, None, "by hand",
                              kv_tokens=None if tokens is None else torch.tensor(tokens).view(1, 1, 2, -1))

    ok = sel([[0, -1], [0, 1]])
    torch.testing.assert_close(attend(q, k, v, ok), attend(q, k, v, ok, backend="reference"))
    for backend in ("auto", "reference", "blocksparse"):
        with pytest.raises(ValueError, match="lists a key block twice"):
            attend(q, k, v, sel([[0, 0], [0, 1]]), backend=backend)
        with pytest.raises(ValueError, match="kv_blocks entries must be -1 .* or key blocks in"):
            attend(q, k, v, sel([[0, 2], [0, 1]]), backend=backend)
        with pytest.raises(ValueError, match="single key tokens must be distinct and outside its kept blocks"):
            attend(q, k, v, sel([[0, -1], [1, -1]], [[3], [20]]), backend=backend)
    attend(q, k, v, sel([[0, -1], [1, -1]], [[20], [3]]))  # tokens outside the kept blocks are fine


def test_a_relative_position_table_for_other_heads_is_refused():
    q, k, v = _qkv(1, 4, 2, 16, 16, grad=False)
    with pytest.raises(ValueError, match="is for 8 heads but q has 4 query heads"):
        attend(q, k, v, SlidingWindow(16, left=3), bias=RelativePositionBias(16, 15, heads=8))


@pytest.mark.parametrize("pattern", [Full(33), Full(9, n_kv=40), Causal(37), Causal(11, n_kv=40), Causal(1, n_kv=25),
                                     Neighborhood((6, 7), 3), SlidingWindow(20, left=3, n_kv=30)])
def test_sdpa_takes_key_padding_exactly(pattern):
    torch.manual_seed(11)
    b, n = 4, pattern.n_kv
    q, k, v = _qkv(b, 4, 2, pattern.n_q, n, dtype=torch.float64)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[0, n // 2 :] = True  # right padding
    pad[1, : n // 3] = True  # left padding: early causal rows see nothing
    pad[2] = True  # all padding
    pad[3, ::3] = True  # scattered
    out, lse = attend(q, k, v, pattern, key_padding_mask=pad, backend="sdpa", return_lse=True)
    want, want_lse = dense(q, k, v, pattern.dense_mask(), padding=pad)
    assert not out.isnan().any() and not lse.isnan().any()
    _assert_float64_exact(out, lse, want, want_lse, (q, k, v))
