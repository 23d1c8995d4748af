"""The native block-sparse kernel against foveal's reference backend (dense, exact) on random shapes.

Ragged blocks, batch > 1, GQA, key padding (a fully padded sequence too), soft-cap, sink
logits, float32 and float64 (float64 to ~1e-12), forward and backward (dq, dk, dv,
dsinks and the lse's own gradient), static patterns and content selections. Skipped,
with the loader's reason, where the extension is not built or is disabled.
"""

import pytest
import torch

from foveal import attend
from foveal.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason=str(native.why_unavailable()))

from foveal.kernels.native.blocksparse import (  # noqa: E402
    native_blocksparse_attention,
    selection_tables,
    static_tables,
    tables_for,
    unsupported,
)
from foveal.bias import ALiBi, RelativePositionBias  # noqa: E402
from foveal.patterns.documents import Document  # noqa: E402
from foveal.patterns.dynamic import BlockSelection, BlockTopK, VerticalSlash  # noqa: E402
from foveal.patterns.global_ import Causal, Full, GlobalTokens, Sinks  # noqa: E402
from foveal.patterns.local import Neighborhood, SlidingWindow  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _inputs(b, hq, hkv, n, d, dv, dtype, seed, n_kv=None):
    g = torch.Generator().manual_seed(seed)
    n_kv = n if n_kv is None else n_kv
    q = torch.randn(b, hq, n, d, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(b, hkv, n_kv, d, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(b, hkv, n_kv, dv, generator=g, dtype=dtype).requires_grad_()
    return q, k, v, g


def _native(q, k, v, pattern, scale, bias=None, **kw):
    return native_blocksparse_attention(q, k, v, tables_for(pattern, q, k), scale, bias=bias, pattern=pattern, **kw)


def _compare(q, k, v, pattern, *, scale=0.3, padding=None, softcap=None, sinks=None, bias=None, seed=0):
    """Forward and backward of the native kernel and of the reference, with random gradients on out and lse."""
    tol = TOL[q.dtype]
    kw = dict(key_padding_mask=padding, softcap=softcap, sink_logits=sinks)
    out, lse = _native(q, k, v, pattern, scale, bias=bias, **kw)
    ref_out, ref_lse = attend(q, k, v, pattern, scale=scale, backend="reference", return_lse=True, bias=bias, **kw)
    assert out.dtype == q.dtype and lse.dtype == ref_lse.dtype
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
    g = torch.Generator().manual_seed(seed + 1)
    g_out = torch.randn(out.shape, generator=g, dtype=q.dtype)
    g_lse = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    live = torch.isfinite(ref_lse)  # -inf rows: the lse has no gradient to give
    table = None if bias is None else bias.table
    wrt = [t for t in (q, k, v, sinks, table) if t is not None and t.requires_grad]

    def loss(o, l):
        return (o * g_out).sum() + torch.where(live, l * g_lse, torch.zeros_like(l)).sum()

    got = torch.autograd.grad(loss(out, lse), wrt)
    want = torch.autograd.grad(loss(ref_out, ref_lse), wrt)
    for name, a, b in zip([n for n, t in zip("q k v sinks table".split(), (q, k, v, sinks, table))
                           if t is not None and t.requires_grad], got, want):
        torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10, msg=lambda m: f"d{name}: {m}")
    return out, lse


STATIC = {
    "causal": lambda n: Causal(n),
    "window|sinks": lambda n: SlidingWindow(n, left=37) | Sinks(n, 5),
    "document": lambda n: Document([n // 3, n - n // 3 - 20, 20]),
    "full": lambda n: Full(n),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(STATIC))
@pytest.mark.parametrize("n, hq, hkv, seed", [(130, 4, 2, 0), (64, 2, 2, 1), (201, 3, 1, 2)])
def test_static_patterns_forward_and_backward(name, n, hq, hkv, seed, dtype):
    q, k, v, _ = _inputs(2, hq, hkv, n, 16, 8, dtype, seed)
    _compare(q, k, v, STATIC[name](n), seed=seed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grid, kernel, dilation", [((9, 11), 3, 1), ((12, 10), (5, 3), 2), ((17, 9), 7, 1)])
def test_neighborhood_2d(grid, kernel, dilation, dtype):
    n = grid[0] * grid[1]
    q, k, v, _ = _inputs(1, 2, 1, n, 8, 8, dtype, 3)
    _compare(q, k, v, Neighborhood(grid, kernel, dilation=dilation))


@pytest.mark.parametrize("pattern", ["causal", "document", "topk"])
def test_more_keys_than_one_chunk(pattern):
    """Query blocks reading more key blocks than one softmax chunk (512 keys), in runs and gaps, and key blocks read
    by more query tiles than one stacked dK/dV tile: forward and backward with padding, soft-cap and sinks."""
    n = 1100
    q, k, v, g = _inputs(2, 4, 2, n, 8, 8, torch.float64, 11)
    padding = torch.rand(2, n, generator=g) < 0.1
    sinks = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    if pattern == "topk":  # 16-key blocks: 32 a chunk; 45 of up to 69 kept, most of them not consecutive
        pat = BlockTopK(n, topk=45, block=16).select(q, k)
    else:
        pat = Causal(n) if pattern == "causal" else Document([700, n - 700])
    _compare(q, k, v, pat, padding=padding, softcap=2.0, sinks=sinks)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padding_softcap_and_sink_logits_together(dtype):
    n = 150
    q, k, v, g = _inputs(3, 4, 2, n, 16, 12, dtype, 4)
    padding = torch.rand(3, n, generator=g) < 0.3
    padding[1] = True  # a fully padded sequence: its rows attend to nothing
    sinks = torch.randn(4, generator=g, dtype=dtype).requires_grad_()
    out, lse = _compare(q, k, v, SlidingWindow(n, left=70) | Sinks(n, 3), padding=padding, softcap=1.5,
                        sinks=sinks)
    assert bool((out[1] == 0).all()) and torch.equal(lse[1], sinks.detach()[:, None].expand(4, n))


def test_rows_with_no_key_give_zero_output_and_minus_inf_lse():
    n = 70
    q, k, v, _ = _inputs(2, 2, 2, n, 8, 8, torch.float64, 5)
    padding = torch.zeros(2, n, dtype=torch.bool)
    padding[0, :40] = True  # under Causal, queries 0..39 of batch 0 see only padding
    out, lse = _compare(q, k, v, Causal(n), padding=padding)
    assert bool((out[0, :, :40] == 0).all()) and bool((lse[0, :, :40] == float("-inf")).all())
    assert torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("softcap", [None, 0.7])
def test_sinks_alone_and_with_softcap(softcap):
    n = 100
    q, k, v, g = _inputs(2, 2, 1, n, 16, 16, torch.float64, 6)
    sinks = (3 * torch.randn(2, generator=g, dtype=torch.float64)).requires_grad_()
    _compare(q, k, v, Causal(n), sinks=sinks, softcap=softcap)


def test_cross_lengths():
    q, k, v, _ = _inputs(2, 2, 1, 90, 8, 8, torch.float64, 7, n_kv=150)
    _compare(q, k, v, Full(90, n_kv=150))
    _compare(q, k, v, Causal(90, n_kv=150))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, block, hq, hkv", [(200, 32, 4, 2), (256, 64, 2, 1), (300, 128, 2, 2), (77, 16, 1, 1)])
def test_block_top_k_selection(n, block, hq, hkv, dtype):
    q, k, v, _ = _inputs(2, hq, hkv, n, 16, 8, dtype, 8)
    sel = BlockTopK(n, topk=3, block=block).select(q, k)
    _compare(q, k, v, sel)


def test_selection_with_explicit_partial_slots_and_mask_fn():
    n, block = 100, 16
    q, k, v, g = _inputs(2, 2, 2, n, 8, 8, torch.float64, 9)
    nb = -(-n // block)
    kv = torch.full((2, 2, nb, 3), -1, dtype=torch.int64)
    for b in range(2):
        for h in range(2):
            for qb in range(nb):
                picks = torch.randperm(nb, generator=g)[: 1 + qb % 3]
                kv[b, h, qb, : picks.numel()] = picks
    partial = (torch.rand(kv.shape, generator=g) < 0.5) & (kv >= 0)
    kv[1, 0, 2] = -1  # a query block with no key at all

    def mask_fn(b, h, q_idx, kv_idx):
        return ((q_idx + 2 * kv_idx + b + h) % 3) != 0

    sel = BlockSelection(n, block, kv, partial, mask_fn, "test")
    _compare(q, k, v, sel)


def test_half_inputs_run_in_float32_and_come_back():
    n = 96
    q, k, v, _ = _inputs(1, 2, 1, n, 16, 16, torch.float32, 10)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out, lse = _native(qb, kb, vb, Causal(n), 0.25)
    ref = attend(qb.float(), kb.float(), vb.float(), Causal(n), scale=0.25, backend="reference")
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert qb.grad.dtype == torch.bfloat16 and kb.grad is not None and vb.grad is not None


def test_no_grad_forward_equals_the_autograd_forward():
    n = 130
    q, k, v, _ = _inputs(2, 2, 1, n, 8, 8, torch.float32, 11)
    p = SlidingWindow(n, left=20)
    with torch.no_grad():
        a = _native(q, k, v, p, 0.3)
    b = _native(q, k, v, p, 0.3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_static_tables_are_cached_and_masks_deduplicated():
    p = SlidingWindow(1000, left=100)
    t = static_tables(p, 2, 2)
    assert static_tables(SlidingWindow(1000, left=100), 2, 2) is t
    assert t.kv_blocks.shape[:2] == (1, 1)
    # a window's partial tiles come in a handful of shapes (its two edges, the ragged end), not one per tile
    assert t.masks.shape[0] <= 6 < int((t.mask_index >= 0).sum())


def test_transposed_table_lists_every_reader_once():
    n = 300
    q, k, _, _ = _inputs(2, 4, 2, n, 8, 8, torch.float32, 12)
    sel = BlockTopK(n, topk=2, block=32).select(q, k)
    t = selection_tables(sel, 2)
    kv = t.kv_blocks
    b, hq, nqb, s = kv.shape
    nkb = -(-n // 32)
    for e in range(t.t_inst.numel()):
        inst, slot = int(t.t_inst[e]), int(t.t_slot[e])
        key = int(torch.searchsorted(t.t_indptr, torch.tensor(e), right=True)) - 1
        kb, bh = key % nkb, key // nkb
        bt, kh = bh // 2, bh % 2
        assert int(kv.view(-1, s)[inst, slot]) == kb
        assert inst // (hq * nqb) == bt and (inst // nqb) % hq // 2 == kh
    assert t.t_inst.numel() == int((kv >= 0).sum())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vertical_slash_selection_without_single_tokens(dtype):
    n = 128  # short enough that every kept column lies in a kept block: no kv_tokens
    q, k, v, _ = _inputs(2, 4, 2, n, 16, 8, dtype, 14)
    sel = VerticalSlash(n, vertical=8, slash=16, last_q=16).select(q, k)
    assert sel.kv_tokens is None or sel.kv_tokens.shape[-1] == 0
    assert unsupported(q, sel) == []
    _compare(q, k, v, sel)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, hq, hkv", [(500, 4, 2), (512, 2, 2)])
def test_vertical_slash_with_single_key_tokens(n, hq, hkv, dtype):
    q, k, v, g = _inputs(2, hq, hkv, n, 16, 8, dtype, 15)
    sel = VerticalSlash(n, vertical=8, slash=64, last_q=16).select(q, k)
    assert sel.kv_tokens.shape[-1] > 0
    assert selection_tables(sel, hkv).tokens_causal  # kept columns: the rule is j <= i
    padding = torch.rand(2, n, generator=g) < 0.1
    _compare(q, k, v, sel, padding=padding, softcap=2.0)


def test_single_key_tokens_under_a_general_mask_fn_with_sinks():
    n, block = 150, 32
    q, k, v, g = _inputs(2, 2, 1, n, 8, 8, torch.float64, 16)
    nb = -(-n // block)
    kv = torch.full((2, 2, nb, 2), -1, dtype=torch.int64)
    tokens = torch.full((2, 2, nb, 70), -1, dtype=torch.int64)  # more than 64: two chunks
    for b in range(2):
        for h in range(2):
            for qb in range(nb):
                blocks = torch.randperm(nb, generator=g)[:2]
                kv[b, h, qb, :2] = blocks
                outside = torch.tensor([j for j in range(n) if j // block not in blocks.tolist()])
                pick = outside[torch.randperm(outside.numel(), generator=g)[: 40 + 7 * qb]]
                tokens[b, h, qb, : pick.numel()] = pick

    def mask_fn(b, h, q_idx, kv_idx):
        return ((q_idx * 3 + kv_idx + h) % 4) != 1

    sel = BlockSelection(n, block, kv, None, mask_fn, "test", kv_tokens=tokens)
    t = selection_tables(sel, 1)
    assert not t.tokens_causal and t.token_bits.shape == (2, 2, nb, block, 2)
    sinks = torch.randn(2, generator=g, dtype=torch.float64).requires_grad_()
    _compare(q, k, v, sel, sinks=sinks)


def test_unsupported_says_why():
    n = 512
    q, k, _, _ = _inputs(1, 2, 2, n, 8, 8, torch.float32, 13)
    assert unsupported(q, Causal(n)) == []
    assert any("native does not take score terms yet" in r for r in unsupported(q, Causal(n), bias=ALiBi(2)))
    sel = BlockTopK(n, topk=2).select(q, k)
    rpb = RelativePositionBias((n,), 8, heads=2)
    assert unsupported(q, Causal(n), bias=rpb) == []
    assert any("native does not take score terms yet" in r for r in unsupported(q, sel, bias=rpb))
    assert any("CPU" in r for r in unsupported(q.to("meta"), Causal(n)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("softcap", [None, 1.3])
def test_relative_position_bias_table_and_its_gradient(dtype, softcap):
    grid, kernel = (11, 13), 5
    n = grid[0] * grid[1]
    q, k, v, g = _inputs(2, 4, 2, n, 16, 8, dtype, 17)
    table = torch.randn(4, 2 * kernel - 1, 2 * kernel - 1, generator=g, dtype=dtype).requires_grad_()
    bias = RelativePositionBias(grid, kernel - 1, table=table)
    _compare(q, k, v, Neighborhood(grid, kernel), bias=bias, softcap=softcap)


def test_relative_position_bias_1d_through_attend():
    n = 170
    q, k, v, g = _inputs(1, 2, 1, n, 8, 8, torch.float64, 18)
    table = torch.randn(2, 2 * 40 + 1, generator=g, dtype=torch.float64).requires_grad_()
    bias = RelativePositionBias((n,), 40, table=table)
    p = SlidingWindow(n, left=40, right=40)
    out = attend(q, k, v, p, bias=bias, backend="native")
    ref = attend(q, k, v, p, bias=bias, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    a = torch.autograd.grad(out.square().sum(), (q, table))
    b = torch.autograd.grad(ref.square().sum(), (q, table))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-11, rtol=1e-11)


def test_auto_takes_native_where_it_was_measured_faster():
    from foveal.kernels.native.blocksparse import AUTO_MIN_FILL, tile_fill
    from foveal.kernels.select import Call, select

    n = 2048
    q, k, v, _ = _inputs(1, 2, 1, n, 8, 8, torch.float32, 19)
    window = SlidingWindow(n, left=511)
    na = Neighborhood((64, 32), 7)
    assert tile_fill(window) >= AUTO_MIN_FILL > tile_fill(na)
    assert select(Call(q, k, v, window, 0.3), "auto").name == "native"
    assert select(Call(q, k, v, na, 0.3), "auto").name == "native-na"  # a bare neighbourhood: its pairs-only kernel
    mixed = na | GlobalTokens((64, 32), 2)
    assert tile_fill(mixed) < AUTO_MIN_FILL
    assert select(Call(q, k, v, mixed, 0.3), "auto").name == "cpu"  # few allowed pairs per tile: the gather kernel
    assert select(Call(q, k, v, BlockTopK(n, topk=2).select(q, k), 0.3), "auto").name == "native"
    assert select(Call(q, k, v, Causal(n), 0.3), "auto").name == "sdpa"
    assert select(Call(q, k, v, window, 0.3, bias=ALiBi(2)), "auto").name == "cpu"
    out = attend(q, k, v, na, backend="native")  # named, it runs whatever the fill
    torch.testing.assert_close(out, attend(q, k, v, na, backend="reference"), atol=2e-5, rtol=2e-5)
