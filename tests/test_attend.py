"""``attend`` on the reference backend against independent computations; errors; gradcheck."""

import math
import random

import pytest
import torch
from strategies import random_pattern

from foveal import Causal, GlobalTokens, Halo, MaskPattern, Neighborhood, Sinks, SlidingWindow, Window, attend
from foveal.gallery import GALLERY


def naive_attention(q, k, v, mask, scale):
    """Loop-per-query softmax attention in float64, written from the definition."""
    b, hq, n, d = q.shape
    groups = hq // k.shape[1]
    out = torch.zeros(b, hq, n, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b, hq, n), -math.inf, dtype=torch.float64)
    for h in range(hq):
        kh, vh = k[:, h // groups].double(), v[:, h // groups].double()
        for i in range(n):
            keys = torch.nonzero(mask[i]).flatten()
            if keys.numel() == 0:
                continue
            s = (q[:, h, i].double()[:, None, :] * kh[:, keys]).sum(-1) * scale  # (b, |keys|)
            lse[:, h, i] = torch.logsumexp(s, -1)
            w = torch.softmax(s, -1)
            out[:, h, i] = (w[:, :, None] * vh[:, keys]).sum(1)
    return out, lse


@pytest.mark.parametrize("seed", range(25))
def test_reference_matches_naive_loops(seed):
    rng = random.Random(seed)
    p, mask = random_pattern(rng)
    hkv = rng.choice([1, 2])
    hq = hkv * rng.choice([1, 3])
    b, d, dv = rng.randint(1, 2), rng.choice([4, 8]), rng.choice([4, 6])
    q, k = torch.randn(b, hq, p.n, d), torch.randn(b, hkv, p.n, d)
    v = torch.randn(b, hkv, p.n, dv)
    scale = rng.choice([None, 0.3])
    out, lse = attend(q, k, v, p, backend="reference", return_lse=True, scale=scale)
    want, want_lse = naive_attention(q, k, v, mask, scale if scale else d**-0.5)
    assert out.shape == (b, hq, p.n, dv) and lse.shape == (b, hq, p.n) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(GALLERY))
def test_reference_matches_sdpa_with_boolean_mask(name):
    p = GALLERY[name]
    q, k, v = (torch.randn(2, 4, p.n, 16) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=p.dense_mask())
    torch.testing.assert_close(attend(q, k, v, p), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    p = Neighborhood((6, 7), 3) | GlobalTokens((6, 7), 2)
    q, k, v = (torch.randn(2, 2, p.n, 8, dtype=dtype) for _ in range(3))
    out, lse = attend(q, k, v, p, return_lse=True)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want, _ = naive_attention(q, k, v, p.dense_mask(), 8**-0.5)
    tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def test_fully_masked_rows_give_zero_and_minus_inf_without_nan():
    # queries 0..9 see nothing; queries 10.. see keys < 5
    p = MaskPattern(20, lambda qi, ki: (qi >= 10) & (ki < 5), name="late_queries")
    q, k, v = (torch.randn(2, 3, 20, 8, requires_grad=True) for _ in range(3))
    out, lse = attend(q, k, v, p, return_lse=True)
    assert torch.all(out[:, :, :10] == 0) and torch.all(torch.isneginf(lse[:, :, :10]))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 10:]).all()
    (out.sum() + lse[:, :, 10:].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, :10] == 0)
    assert torch.all(k.grad[:, :, 5:] == 0) and torch.all(v.grad[:, :, 5:] == 0)


GRADCHECK_PATTERNS = [
    Causal(13),
    SlidingWindow(17, 3, 2, dilation=2) | Sinks(17, 2),
    Neighborhood((4, 5), (3, 2), dilation=(1, 2), stride=(2, 1), causal=(False, True)),
    Neighborhood((3, 3, 4), 2),
    Window((4, 6), (2, 3)) | GlobalTokens((4, 6), 1),
    Halo((5, 4), 2, 1),
    MaskPattern(9, lambda qi, ki: (qi % 3 == 0) & (ki <= qi), name="some_rows_empty"),
]


@pytest.mark.parametrize("pattern", GRADCHECK_PATTERNS, ids=repr)
def test_gradcheck_float64(pattern):
    n = pattern.n
    q = torch.randn(1, 2, n, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, n, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, n, 2, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        out, lse = attend(q, k, v, pattern, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, (q, k, v))


def _qkv(n=16, hq=2, hkv=1, d=4):
    return torch.randn(1, hq, n, d), torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.randn(16, 4), *_qkv()[1:]), {}, ValueError, r"q must be 4-D .* got shape \(16, 4\)"),
        ((*_qkv(hq=3, hkv=2),), {}, ValueError, r"multiple of key/value heads .* 3 query and 2"),
        ((*_qkv(n=15),), {}, ValueError, r"q has 15 tokens but the pattern Causal\(n=16\) has 16"),
        ((_qkv()[0], torch.randn(1, 1, 16, 5), _qkv()[2]), {}, ValueError, r"share head_dim, got 4 and 5"),
        ((_qkv()[0], _qkv()[1], torch.randn(1, 1, 15, 4)), {}, ValueError, r"k and v must agree"),
        ((_qkv()[0], torch.randn(2, 1, 16, 4), torch.randn(2, 1, 16, 4)), {}, ValueError, r"batch sizes differ"),
        ((_qkv()[0].double(), *_qkv()[1:]), {}, TypeError, r"share one dtype"),
        ((_qkv()[0].int(), *_qkv()[1:]), {}, TypeError, r"q must have one of the dtypes"),
        ((*_qkv(),), {"scale": -1.0}, ValueError, r"scale must be a positive finite number or None, got -1.0"),
        ((*_qkv(),), {"backend": "cuda-magic"}, ValueError, r"backend must be 'auto' or one of .*'cuda-magic'"),
    ],
)
def test_bad_inputs_are_refused(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        attend(*args, Causal(16), **kwargs)


def test_pattern_argument_is_checked():
    with pytest.raises(TypeError, match="pattern must be a foveal Pattern, got str"):
        attend(*_qkv(), "causal")


def test_reference_refuses_what_would_exhaust_memory():
    big = SlidingWindow(1 << 15, 16)
    q = torch.zeros(1, 1, 1 << 15, 1)
    with pytest.raises(ValueError, match="backend 'reference' cannot run this call: reference materialises"):
        attend(q, q, q, big, backend="reference")
