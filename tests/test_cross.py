"""Cross attention (n_q ≠ n_kv): bottom-right alignment, layouts, every backend."""

import random

import pytest
import torch

from foveal import BlockLayout, Causal, Full, GlobalTokens, MaskPattern, Neighborhood, Sinks, SlidingWindow, attend


def brute(nq, nkv, allowed):
    m = torch.zeros(nq, nkv, dtype=torch.bool)
    for i in range(nq):
        for j in range(nkv):
            m[i, j] = allowed(i, j)
    return m


def random_cross(rng):
    nq, nkv = rng.randint(1, 60), rng.randint(1, 60)
    off = nkv - nq
    kind = rng.choice(["full", "causal", "window", "sinks", "global", "union"])
    if kind == "full":
        return Full(nq, n_kv=nkv), brute(nq, nkv, lambda i, j: True)
    if kind == "causal":
        return Causal(nq, n_kv=nkv), brute(nq, nkv, lambda i, j: j <= i + off)
    if kind in ("window", "union"):
        left, right, d = rng.randint(0, 12), rng.randint(0, 5), rng.randint(1, 3)
        p = SlidingWindow(nq, left, right, d, n_kv=nkv)
        m = brute(nq, nkv, lambda i, j: i + off - left <= j <= i + off + right and (i + off - j) % d == 0)
        if kind == "window":
            return p, m
        c = rng.randint(1, nkv)
        return p | Sinks(nq, c, n_kv=nkv), m | brute(nq, nkv, lambda i, j: j < c and j <= i + off)
    c = rng.randint(1, nkv)
    if kind == "sinks":
        return Sinks(nq, c, n_kv=nkv), brute(nq, nkv, lambda i, j: j < c and j <= i + off)
    return GlobalTokens(nq, c, n_kv=nkv), brute(nq, nkv, lambda i, j: i < c or j < c)


@pytest.mark.parametrize("seed", range(80))
def test_cross_masks_layouts_and_density(seed):
    rng = random.Random(seed)
    p, expected = random_cross(rng)
    assert (p.n_q, p.n_kv) == tuple(expected.shape)
    assert torch.equal(p.dense_mask(), expected), p
    assert p.density() == pytest.approx(expected.float().mean().item())
    bq, bk = rng.randint(1, 20), rng.randint(1, 20)
    got = p.layout(bq, bk).block_states()
    want = BlockLayout.from_dense_mask(expected, bq, bk).block_states()
    if "|" in repr(p):
        assert torch.all((want == 0) | (got != 0)) and torch.all((got != 2) | (want == 2))
    else:
        assert torch.equal(got, want), (p, bq, bk)


def test_causal_cross_is_aligned_bottom_right():
    # decoding: one query over 10 cached keys sees them all; 4 queries over 2 keys: the first two see none
    assert Causal(1, n_kv=10).dense_mask().all()
    m = Causal(4, n_kv=2).dense_mask()
    assert m.tolist() == [[False, False], [False, False], [True, False], [True, True]]
    assert "n_kv=10" in repr(Causal(1, n_kv=10)) and Causal(5, n_kv=5) == Causal(5)


@pytest.mark.parametrize("seed", range(20))
def test_cross_on_every_backend(seed):
    rng = random.Random(100 + seed)
    p, _ = random_cross(rng)
    q = torch.randn(2, 4, p.n_q, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, p.n_kv, 8, requires_grad=True) for _ in range(2))
    out, lse = attend(q, k, v, p, backend="cpu", return_lse=True)
    ref, ref_lse = attend(q, k, v, p, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_cross_to_flex_matches_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    p = SlidingWindow(70, 20, n_kv=150) | Sinks(70, 3, n_kv=150)
    ours = p.layout(16, 16).to_flex(p.mask_mod)
    theirs = create_block_mask(p.mask_mod, 1, 1, 70, 150, device="cpu", BLOCK_SIZE=(16, 16))
    assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    assert ours.seq_lengths == (70, 150)


def test_cross_errors():
    with pytest.raises(ValueError, match="same number of keys"):
        Causal(10, n_kv=20) | Causal(10, n_kv=30)
    with pytest.raises(ValueError, match="n_kv must be >= 1, got 0"):
        Full(10, n_kv=0)
    with pytest.raises(ValueError, match="count must be <= the number of tokens 5, got 6"):
        Sinks(10, 6, n_kv=5)
    q = torch.randn(1, 1, 10, 4)
    with pytest.raises(ValueError, match=r"k and v have 10 tokens but the pattern .* has 20 keys"):
        attend(q, q, q, Causal(10, n_kv=20))
    with pytest.raises(TypeError):
        Neighborhood((4, 4), 3, n_kv=20)
    p = MaskPattern(6, lambda qi, ki: ki <= 2 * qi, n_kv=12)
    assert p.dense_mask().shape == (6, 12)
