"""The blocksparse kernel's fast paths against the dense reference backend, forward and backward.

Paths: whole-block gathers and slot reordering (special slots first, unused last), masks
only on special slots, vertical-slash's ``block_tiles`` (Toeplitz windows), consecutive
key blocks read as a view (one-instance chunks), GQA, ragged last blocks, and the score
term, key padding and soft-cap still applied on all of them.
"""

import pytest
import torch

import foveal.kernels.blocksparse as bsk
from foveal import attend
from foveal.patterns.dynamic import DHSA, BlockSelection, BlockTopK, VerticalSlash


def _qkv(n, hq, hkv, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, n, d, generator=g, dtype=torch.float64).float().requires_grad_()
            for h in (hq, hkv, hkv)]


def _check(q, k, v, sel, **terms):
    """blocksparse against reference on the same selection: out, lse and the gradients of q, k, v."""
    got = attend(q, k, v, sel, backend="blocksparse", return_lse=True, **terms)
    ref = attend(q, k, v, sel, backend="reference", return_lse=True, **terms)
    torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=2e-5)
    alive = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(got[1]), alive)
    torch.testing.assert_close(got[1][alive], ref[1][alive], atol=2e-5, rtol=2e-5)
    go = torch.randn_like(got[0])
    g1 = torch.autograd.grad((got[0] * go).sum(), (q, k, v))
    g2 = torch.autograd.grad((ref[0] * go).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def _vertical_slash_rule(cols, offs, n):
    """(B, H, n, n) bool from the definition, by a loop over queries: j <= i and (j kept or i - j kept)."""
    b, h = cols.shape[:2]
    m = torch.zeros(b, h, n, n, dtype=torch.bool)
    for i in range(n):
        j = torch.arange(i + 1)
        m[:, :, i, : i + 1] = cols[:, :, j] | offs[:, :, i - j]
    return m


@pytest.mark.parametrize("n, block", [(50, 8), (64, 16), (37, 4)])
def test_vertical_slash_tiles_equal_the_definition(n, block):
    torch.manual_seed(n)
    q, k, _ = _qkv(n, 4, 2)
    sel = VerticalSlash(n, vertical=5, slash=6, last_q=8, always_vertical=1, always_slash=2, block=block).select(q, k)
    rule = sel.mask_fn
    nb = -(-n // block)
    bb, hh, qb, kb = (x.reshape(-1) for x in torch.meshgrid(*(torch.arange(s) for s in (2, 4, nb, nb)), indexing="ij"))
    tiles = rule.block_tiles(bb, hh, qb, kb, block).view(2, 4, nb, nb, block, block)
    dense = tiles.permute(0, 1, 2, 4, 3, 5).reshape(2, 4, nb * block, nb * block)[:, :, :n, :n]
    assert torch.equal(dense, _vertical_slash_rule(sel.info["columns"], sel.info["offsets"], n))


class _Elementwise:
    """The same rule without ``block_tiles``: the kernel must evaluate it elementwise."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, b, h, i, j):
        return self.fn(b, h, i, j)


@pytest.mark.parametrize("tiles", [True, False])
@pytest.mark.parametrize("n", [64, 75])  # even and ragged
def test_vertical_slash_on_blocksparse_gqa_and_ragged(n, tiles):
    q, k, v = _qkv(n, 4, 2, seed=n)
    sel = VerticalSlash(n, vertical=6, slash=10, last_q=16, always_vertical=2, always_slash=3, block=16).select(q, k)
    if not tiles:
        sel = BlockSelection(sel.n, sel.block, sel.kv_blocks, sel.partial, _Elementwise(sel.mask_fn), sel.method,
                             sel.info, sel.kv_tokens, sel.tokens_in_mask_fn)
    _check(q, k, v, sel)


@pytest.mark.parametrize("make", [lambda n: BlockTopK(n, 3, block=8, sinks=1), lambda n: DHSA(n, budget=24, chunk=8),
                                  lambda n: BlockTopK(n, 3, block=8, causal=False)])  # ragged block kept whole
@pytest.mark.parametrize("heads", [(4, 1), (2, 2)])
def test_block_selectors_with_diagonal_special_slots(make, heads):
    n = 61  # ragged: the last key block is special wherever it is kept
    q, k, v = _qkv(n, *heads, seed=7)
    _check(q, k, v, make(n).select(q, k))


def test_consecutive_blocks_are_read_as_a_view(monkeypatch):
    # one instance per chunk: every causal prefix is a run of consecutive key blocks
    monkeypatch.setattr(bsk, "SCORE_ELEMENTS", 1)
    seen = []
    real = bsk._run

    def spy(ids, r):
        out = real(ids, r)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(bsk, "_run", spy)
    n, block = 70, 8
    q, k, v = _qkv(n, 4, 2, seed=3)
    nb = -(-n // block)
    kv = torch.arange(nb).expand(nb, nb).masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), -1)
    kv = kv[None, None].expand(2, 4, nb, nb).clone()
    kv[1, 2, 5, 2] = -1  # a hole: this row is gathered, not viewed
    sel = BlockSelection(n, block, kv, None, lambda b, h, i, j: j <= i, "test")  # every slot masked, in order
    _check(q, k, v, sel)
    assert any(seen) and not all(seen)


def test_terms_padding_and_softcap_still_apply():
    n = 45
    q, k, v = _qkv(n, 4, 2, seed=11)
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[0, 3:9] = True
    pad[1, -4:] = True

    def term(h, i, j):
        return 0.05 * (i - j).float() * (h + 1)

    for pattern in (VerticalSlash(n, vertical=4, slash=6, last_q=8, always_vertical=1, always_slash=2, block=8),
                    BlockTopK(n, 2, block=8)):
        _check(q, k, v, pattern.select(q, k), bias=term, key_padding_mask=pad, softcap=2.0)
