"""Analytic layouts against layouts derived from the dense mask, on random sizes and tilings."""

import random
import time

import pytest
import torch
from strategies import random_pattern

from foveal import BlockLayout, Causal, GlobalTokens, Neighborhood, Sinks, SlidingWindow, Strided, Window
from foveal.layout import EMPTY, FULL


def _random_blocks(rng, n):
    return rng.randint(1, max(1, n + 3)), rng.randint(1, max(1, n + 3))


@pytest.mark.parametrize("seed", range(150))
def test_analytic_layout_equals_dense_derived(seed):
    rng = random.Random(seed)
    p, expected_mask = random_pattern(rng)
    bq, bk = _random_blocks(rng, p.n)
    got = p.layout(bq, bk)
    want = BlockLayout.from_dense_mask(expected_mask, bq, bk)
    assert got.method == "analytic"
    assert torch.equal(got.block_states(), want.block_states()), (p, bq, bk)
    assert torch.equal(got.full_indptr, want.full_indptr) and torch.equal(got.full_indices, want.full_indices)
    assert torch.equal(got.partial_indptr, want.partial_indptr)
    assert torch.equal(got.partial_indices, want.partial_indices)


def _check_conservative(layout, mask):
    """Every non-empty block is listed, and every block listed as full is full."""
    exact = BlockLayout.from_dense_mask(mask, layout.block_q, layout.block_k).block_states()
    got = layout.block_states()
    assert torch.all((exact == EMPTY) | (got != EMPTY)), "a non-empty block is missing"
    assert torch.all((got != FULL) | (exact == FULL)), "a block listed as full is not full"


@pytest.mark.parametrize("seed", range(60))
def test_union_and_intersection_layouts_are_conservative_and_exact_where_full(seed):
    rng = random.Random(10_000 + seed)
    a, ma = random_pattern(rng)
    # a second pattern with the same token count
    for _ in range(100):
        b, mb = random_pattern(rng)
        if b.n == a.n and (len(a.shape) == 1 or len(b.shape) == 1 or a.shape == b.shape):
            break
    else:
        b, mb = Causal(a.n), torch.ones(a.n, a.n, dtype=torch.bool).tril()
    bq, bk = _random_blocks(rng, a.n)
    _check_conservative((a | b).layout(bq, bk), ma | mb)
    _check_conservative((a & b).layout(bq, bk), ma & mb)
    assert torch.equal((a | b).dense_mask(), ma | mb)
    assert torch.equal((a & b).dense_mask(), ma & mb)


def test_union_of_disjoint_parts_keeps_full_blocks():
    p = SlidingWindow(256, 31) | Sinks(256, 32)
    states = p.layout(32, 32).block_states()
    # query block 5 (rows 160..191): sinks block 0 full, window edge block 4 and diagonal block 5 partial
    assert states[5].tolist() == [FULL, EMPTY, EMPTY, EMPTY, 1, 1, EMPTY, EMPTY]
    assert torch.equal(states, BlockLayout.from_dense_mask(p.dense_mask(), 32, 32).block_states())


def test_sliding_window_layout_for_a_million_tokens_is_analytic(monkeypatch):
    # the layout never evaluates the mask (N² = 1e12 pairs): it is derived from the progressions.
    # CPU time, not wall time, so a loaded machine does not fail it; the speed itself is a benchmark.
    p = SlidingWindow(1_000_000, 1024)

    def refuse(*args):
        raise AssertionError("the analytic layout must not evaluate the mask")

    monkeypatch.setattr(SlidingWindow, "mask", refuse)
    start = time.process_time()
    lay = p.layout(128, 128)
    elapsed = time.process_time() - start
    assert elapsed < 10.0, f"layout took {elapsed:.2f}s of CPU"
    # query block 100 (rows 12800..12927) reaches keys 11776..12927: blocks 92..100,
    # 7 full and 2 partial (the window's far edge and the diagonal)
    counts = lay.kv_blocks_per_q_block()
    assert int(counts[100]) == 9
    assert int(lay.full_indptr.diff()[100]) == 7
    assert lay.num_full + lay.num_partial == int(counts.sum())


def test_layout_cost_grows_with_nonempty_blocks():
    # 2-D neighbourhood on a 256x256 grid (65k tokens): the analytic layout touches
    # O(non-empty blocks), so this is quick even though N^2 = 4.3e9.
    start = time.process_time()
    lay = Neighborhood((256, 256), 7).layout(256, 256)
    assert time.process_time() - start < 20.0
    assert lay.num_full + lay.num_partial <= 256 * 8


def test_layout_is_cached_and_validates_block_sizes():
    p = Causal(100)
    assert p.layout(16, 32) is p.layout(16, 32)
    with pytest.raises(ValueError, match="block_q must be >= 1, got 0"):
        p.layout(0)
    with pytest.raises(TypeError, match="block_k must be an int"):
        p.layout(16, 2.0)


def test_layout_algebra_checks_tiling():
    with pytest.raises(ValueError, match="must share"):
        Causal(64).layout(16) | Causal(64).layout(32)
    with pytest.raises(TypeError, match="BlockLayout"):
        Causal(64).layout(16) & 3


@pytest.mark.parametrize(
    "pattern",
    [
        Causal(200),
        SlidingWindow(200, 17, 5),
        Neighborhood((12, 15), (3, 5), dilation=(2, 1)),
        Window((12, 16), (4, 8)) | GlobalTokens((12, 16), 3),
        Strided(150, 7) & Causal(150),
    ],
    ids=repr,
)
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (24, 40)])
def test_to_flex_matches_create_block_mask(pattern, blocks):
    from torch.nn.attention.flex_attention import create_block_mask

    bq, bk = blocks
    ours = pattern.layout(bq, bk).to_flex(pattern.mask_mod)
    theirs = create_block_mask(pattern.mask_mod, 1, 1, pattern.n, pattern.n, device="cpu", BLOCK_SIZE=(bq, bk))
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    # same sets of blocks per row (order within a row may differ)
    def rows(bm, num, idx):
        num, idx = getattr(bm, num)[0, 0], getattr(bm, idx)[0, 0]
        return [sorted(idx[r, : num[r]].tolist()) for r in range(num.numel())]

    assert rows(ours, "kv_num_blocks", "kv_indices") == rows(theirs, "kv_num_blocks", "kv_indices")
    assert rows(ours, "full_kv_num_blocks", "full_kv_indices") == rows(theirs, "full_kv_num_blocks", "full_kv_indices")
    assert ours.seq_lengths == (pattern.n, pattern.n)


def test_to_flex_drives_flex_attention_exactly():
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    from foveal import attend

    p = Neighborhood((9, 10), 3, dilation=2) | GlobalTokens((9, 10), 2)
    q, k, v = (torch.randn(2, 3, p.n, 16) for _ in range(3))
    bm = p.layout(16, 16).to_flex(p.mask_mod)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=bm)
    torch.testing.assert_close(out, attend(q, k, v, p, backend="reference"), atol=1e-5, rtol=1e-5)
