"""The native neighbourhood kernel (issue 20) against foveal's reference backend and NATTEN's CPU forward.

Random shapes: 1-, 2- and 3-D grids (odd and even), kernel sizes up to 7, dilation,
stride, per-axis causal, batch 2, GQA, key padding, softcap, sink logits, relative
position tables; float64 to ~1e-12 and float32; forward (out, lse) and backward (dq,
dk, dv, the sinks' and the table's gradients, with a gradient on the lse too). Skipped
with the loader's reason where the extension is not built or is disabled.
"""

import random
import warnings

import pytest
import torch

from foveal import Neighborhood, attend
from foveal.bias import RelativePositionBias
from foveal.kernels import native
from foveal.patterns import GlobalTokens

pytestmark = pytest.mark.skipif(not native.available(), reason=str(native.why_unavailable()))

if native.available():
    from foveal.kernels.native.neighborhood import native_neighborhood_attention, why_not

TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}


def _case(rng, ndim, strided=True):
    max_len = {1: 40, 2: 12, 3: 7}[ndim]
    shape = tuple(rng.randint(3, max_len) for _ in range(ndim))
    k, d, s, c = [], [], [], []
    for length in shape:
        kk = rng.randint(2, min(7, length))
        k.append(kk)
        d.append(rng.randint(1, min(3, length // kk)))
        s.append(rng.randint(1, kk) if strided and rng.random() < 0.4 else 1)
        c.append(rng.random() < 0.3)
    return Neighborhood(shape, tuple(k), dilation=tuple(d), stride=tuple(s), causal=tuple(c))


def _qkv(rng, n, dtype, hq=None, hkv=None, dim=None, dv=None):
    hkv = hkv or rng.choice([1, 2])
    hq = hq or hkv * rng.choice([1, 2])
    dim = dim or rng.choice([4, 8, 19, 32])
    dv = dv or rng.choice([dim, 5])
    q = torch.randn(2, hq, n, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(2, hkv, n, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(2, hkv, n, dv, dtype=dtype, requires_grad=True)
    return q, k, v


def _compare(p, q, k, v, dtype, extra=(), **kw):
    """Forward and backward of the native kernel against attend(backend="reference"), with a random
    gradient on both out and lse; ``extra`` lists more tensors whose gradients must agree."""
    out, lse = native_neighborhood_attention(q, k, v, p, **kw)
    ref_kw = {("bias" if name == "bias" else name): val for name, val in kw.items()}
    want_out, want_lse = attend(q, k, v, p, backend="reference", return_lse=True, **ref_kw)
    tol = TOL[dtype]
    torch.testing.assert_close(out, want_out, **tol, msg=lambda m: f"out, {p!r}: {m}")
    torch.testing.assert_close(lse, want_lse, **tol, msg=lambda m: f"lse, {p!r}: {m}")
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    finite = torch.isfinite(want_lse)
    gl = torch.where(finite, gl, torch.zeros_like(gl))
    inputs = (q, k, v, *extra)

    def loss(o, l):  # noqa: E741
        return (o * go).sum() + (torch.where(finite, l, torch.zeros_like(l)) * gl).sum()

    got = torch.autograd.grad(loss(out, lse), inputs)
    want = torch.autograd.grad(loss(want_out, want_lse), inputs)
    for name, a, b in zip(("dq", "dk", "dv", "dextra0", "dextra1"), got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}, {p!r}: {m}")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_float64_matches_the_reference(seed, ndim):
    rng = random.Random(100 * ndim + seed)
    p = _case(rng, ndim)
    _compare(p, *_qkv(rng, p.n_q, torch.float64), torch.float64)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_float32_matches_the_reference(seed, ndim):
    rng = random.Random(200 * ndim + seed)
    p = _case(rng, ndim)
    _compare(p, *_qkv(rng, p.n_q, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_padding_softcap_and_sinks(dtype, ndim):
    rng = random.Random(300 + ndim)
    p = _case(rng, ndim)
    q, k, v = _qkv(rng, p.n_q, dtype, hq=4, hkv=2)
    pad = torch.rand(2, p.n_q) < 0.3
    pad[1] = True  # the second batch element has no key at all: zero output, lse = the sink
    sinks = torch.randn(4, dtype=dtype, requires_grad=True)
    _compare(p, q, k, v, dtype, extra=(sinks,), key_padding_mask=pad, softcap=2.5, sink_logits=sinks)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_without_keys_and_without_sinks_are_zero_with_lse_minus_inf(dtype):
    p = Neighborhood((6, 7), 3, causal=(True, False))
    q, k, v = _qkv(random.Random(1), p.n_q, dtype, hq=2, hkv=1)
    pad = torch.zeros(2, p.n_q, dtype=torch.bool)
    pad[0, :21] = True  # the first three rows: their causal windows hold only padding
    out, lse = native_neighborhood_attention(q, k, v, p, key_padding_mask=pad)
    assert (out[0, :, :7] == 0).all() and torch.isneginf(lse[0, :, :7]).all() and torch.isfinite(lse[1]).all()
    _compare(p, q, k, v, dtype, key_padding_mask=pad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_relative_position_tables_and_their_gradient(dtype, ndim):
    rng = random.Random(400 + ndim)
    p = _case(rng, ndim)
    q, k, v = _qkv(rng, p.n_q, dtype, hq=2, hkv=1)
    sizes = [2 * kk - 1 for kk in p.kernel_size]
    table = torch.randn(2, *sizes, dtype=dtype, requires_grad=True)
    rpb = RelativePositionBias(p.shape, tuple(kk - 1 for kk in p.kernel_size), table=table, step=p.dilation)
    _compare(p, q, k, v, dtype, extra=(table,), bias=rpb, softcap=3.0)


def test_kernel_sizes_three_to_seven_on_odd_and_even_grids():
    for i, (grid, ks) in enumerate([((9,), 3), ((10, 11), 5), ((8, 8), 7), ((7, 8), (7, 4)), ((5, 6, 7), (3, 5, 7))]):
        rng = random.Random(i)
        p = Neighborhood(grid, ks)
        _compare(p, *_qkv(rng, p.n_q, torch.float64), torch.float64)


def test_bfloat16_inputs_run_in_float32():
    p = Neighborhood((8, 9), 3)
    q, k, v = (torch.randn(1, 2, p.n_q, 16).bfloat16().requires_grad_() for _ in range(3))
    out, lse = native_neighborhood_attention(q, k, v, p)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want, want_lse = attend(q.float(), k.float(), v.float(), p, backend="reference", return_lse=True)
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_forward_equals_natten(seed, ndim):
    natten_f = pytest.importorskip("natten.functional")
    na = {1: natten_f.na1d, 2: natten_f.na2d, 3: natten_f.na3d}[ndim]
    rng = random.Random(500 * ndim + seed)
    p = _case(rng, ndim)
    heads, dim = 2, 8
    q, k, v = (torch.randn(2, *p.shape, heads, dim) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = na(q, k, v, kernel_size=p.kernel_size, stride=p.stride, dilation=p.dilation, is_causal=p.causal)

    def to_bhnd(t):
        return t.reshape(2, -1, heads, dim).transpose(1, 2).contiguous()

    out = native_neighborhood_attention(to_bhnd(q), to_bhnd(k), to_bhnd(v), p, need_lse=False)
    torch.testing.assert_close(out, to_bhnd(want), atol=1e-5, rtol=1e-5, msg=lambda m: f"{p!r}: {m}")


def test_why_not_names_what_it_cannot_run():
    p = Neighborhood((6, 6), 3)
    q = torch.randn(1, 2, 36, 8)
    assert why_not(q, q, q, p) == []
    composed = p | GlobalTokens(36, 2)
    assert any("bare Neighborhood" in r for r in why_not(q, q, q, composed))
    assert any("RelativePositionBias" in r for r in why_not(q, q, q, p, bias=lambda h, i, j: 0.0 * i))
    wrong_grid = RelativePositionBias((6, 5), 2, heads=2)
    assert any("grid" in r for r in why_not(q, q, q, p, bias=wrong_grid))
    with pytest.raises(ValueError, match="bare Neighborhood"):
        native_neighborhood_attention(q, q, q, composed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_long_rows_run_the_tiled_path_with_every_term(dtype, causal):
    """Rows long enough that most queries run in vector tiles (the kernel's fast path), with dilation on the
    last axis, a relative-position table, softcap and sinks; and the same with key padding (the per-query path)."""
    p = Neighborhood((5, 45), (3, 7), dilation=(1, 2), causal=(False, causal))
    q, k, v = _qkv(random.Random(7), p.n_q, dtype, hq=4, hkv=2, dim=24, dv=24)
    table = torch.randn(4, 5, 13, dtype=dtype, requires_grad=True)
    rpb = RelativePositionBias(p.shape, (2, 6), table=table, step=p.dilation)
    sinks = torch.randn(4, dtype=dtype, requires_grad=True)
    _compare(p, q, k, v, dtype, extra=(sinks, table), bias=rpb, softcap=4.0, sink_logits=sinks)
    pad = torch.rand(2, p.n_q) < 0.2
    _compare(p, q, k, v, dtype, extra=(sinks,), key_padding_mask=pad, sink_logits=sinks)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_with_and_without_the_forwards_transposed_copies(dtype):
    """The backward reuses the row-transposed q, k, v a forward kept (autograd's path, which the tests above
    check against the reference) or transposes them itself: both give the same gradients, with a gradient on the
    lse (delta = rowsum(dO ∘ O) − grad_lse in the kernel), GQA, batch 2, ragged tiles (rows of 37) and a table."""
    from foveal.kernels.native.neighborhood import _bias_index, tables

    p = Neighborhood((3, 37), (3, 5), dilation=(1, 2))
    q, k, v = (x.detach() for x in _qkv(random.Random(9), p.n_q, dtype, hq=4, hkv=2, dim=19, dv=19))
    table = torch.randn(4, 5 * 9, dtype=dtype)
    rpb = RelativePositionBias(p.shape, (2, 4), table=table.reshape(4, 5, 9), step=p.dilation)
    t, (bias_index, _) = tables(p), _bias_index(p, rpb)
    ops = native.ops()
    common = dict(geometry=t["geometry"], first=t["first"], count=t["count"], scale=0.3, softcap=3.0,
                  bias_table=table, bias_index=bias_index)
    out, lse, kept = ops.na_forward(q=q, k=k, v=v, keep_transposed=True, **common)
    out2, lse2, none = ops.na_forward(q=q, k=k, v=v, **common)
    assert kept.numel() > q.numel() + k.numel() + v.numel() and none.numel() == 0
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = [ops.na_backward(grad_out=go, q=q, k=k, v=v, out=out, lse=lse, grad_lse=gl, inv_ptr=t["inv_ptr"],
                             inv_x=t["inv_x"], inv_m=t["inv_m"], need_bias_grad=True, transposed=tr, **common)
             for tr in (kept, None)]
    torch.testing.assert_close(grads[0][4], (go * out).sum(-1) - gl, **TOL[dtype])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
