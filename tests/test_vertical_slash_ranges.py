"""VerticalSlashRanges against a plain-Python transcription of MInference's index conversion.

The oracle (``minference_walk``) is ``convert_vertical_slash_indexes_kernel`` of MInference's
``csrc/vertical_slash_index.cu`` line by line; ``oracle_mask`` attends each saved range whole
under the causal mask and each gathered column, as its kernel does. Kept columns and offsets
are set directly (``_fixed``) so that the cases are chosen: offsets without 0, none at all,
few and many columns. Then attention on the native and eager kernels against the reference
backend, forward and backward; the C++ conversion against the torch fallback; and the cases
where the range form and the exact-diagonal ``VerticalSlash`` differ.
"""

import pytest
import torch

from foveal import attend
from foveal.kernels import native
from foveal.patterns import VerticalSlash, VerticalSlashRanges
from foveal.patterns.vertical_slash_ranges import (
    kept_lists,
    range_tiles,
    vertical_slash_index,
    vertical_slash_index_torch,
)
from test_native_blocksparse import _compare, _inputs

needs_native = pytest.mark.skipif(not native.available(), reason=str(native.why_unavailable()))


# -- the oracle: MInference's walk, transcribed ------------------------------------


def minference_walk(vertical, slash, end_m, block):
    """One query block's ``(ranges, columns)``: ``vertical`` ascending, ``slash`` descending (Python lists)."""
    ranges, columns = [], []
    v = s = 0
    v_idx = vertical[v] if v < len(vertical) else end_m + block
    v += 1
    s_idx = slash[s] if s < len(slash) else -1
    s += 1
    while s_idx >= end_m and s < len(slash):
        s_idx = slash[s]
        s += 1
    s_idx = end_m + block if s_idx >= end_m else max(end_m - s_idx, block)
    range_start, range_end = s_idx - block, s_idx
    while True:
        if v_idx < range_end:
            if v_idx < range_start:
                columns.append(v_idx)
            v_idx = vertical[v] if v < len(vertical) else end_m + block
            v += 1
        else:
            if s < len(slash):
                s_idx = max(end_m - slash[s], block)
                s += 1
            else:
                ranges.append((range_start, range_end))
                break
            if s_idx > range_end + block:
                ranges.append((range_start, range_end))
                range_start, range_end = s_idx - block, s_idx
            elif s_idx > range_end:
                range_end += block
    return ranges, columns


def oracle_mask(columns, offsets, n, block):
    """(B, H, n, n) bool: MInference's kernel over the walk's ranges (whole, causal) and gathered columns."""
    b, h, _ = columns.shape
    mask = torch.zeros(b, h, n, n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            vert = columns[bi, hi].nonzero().flatten().tolist()
            slash = sorted(offsets[bi, hi].nonzero().flatten().tolist(), reverse=True)
            for qb in range(-(-n // block)):
                ranges, cols = minference_walk(vert, slash, (qb + 1) * block, block)
                for i in range(qb * block, min((qb + 1) * block, n)):
                    for rs, re in ranges:
                        mask[bi, hi, i, rs:min(re, i + 1)] = True
                    for c in cols:
                        if c <= i:
                            mask[bi, hi, i, c] = True
    return mask


def _random_sets(b, h, n, n_cols, n_offs, seed, zero=True):
    g = torch.Generator().manual_seed(seed)
    cols = torch.zeros(b, h, n, dtype=torch.bool)
    offs = torch.zeros_like(cols)
    for bi in range(b):
        for hi in range(h):
            cols[bi, hi, torch.randperm(n, generator=g)[:n_cols]] = True
            offs[bi, hi, torch.randperm(n, generator=g)[:n_offs]] = True
    if not zero:
        offs[..., 0] = False
    return cols, offs


def _fixed(pattern, cols, offs):
    """The pattern with its kept columns and offsets set (its ranking is VerticalSlash's, tested there)."""
    pattern._kept = lambda q, k, scale: (cols, offs)
    return pattern


CASES = [  # n, block, columns, offsets, offset 0 kept
    (50, 16, 5, 8, True),
    (130, 64, 3, 10, False),
    (200, 32, 40, 3, False),
    (257, 64, 100, 30, True),
    (300, 16, 2, 60, False),
    (190, 32, 0, 1, False),
    (160, 16, 20, 0, False),  # no offset at all: MInference's s_idx = -1
]


@pytest.mark.parametrize("n, block, n_cols, n_offs, zero", CASES)
def test_mask_equals_minference_walk(n, block, n_cols, n_offs, zero):
    cols, offs = _random_sets(2, 3, n, n_cols, n_offs, seed=n + block, zero=zero)
    q, k, v, _ = _inputs(2, 3, 3, n, 8, 8, torch.float64, n)
    sel = _fixed(VerticalSlashRanges(n, block=block), cols, offs).select(q, k)
    want = oracle_mask(cols, offs, n, block)
    assert torch.equal(sel.dense_mask(), want)  # tables (kv_blocks, partial, kv_tokens) with the rule
    ar = torch.arange(n)
    bi, hi = torch.arange(2)[:, None, None, None], torch.arange(3)[None, :, None, None]
    assert torch.equal(sel.mask_fn(bi, hi, ar[:, None], ar[None, :]), want)  # the elementwise rule alone
    assert torch.equal(sel.keys_kept(), want.sum((-1, -2)))
    # the reference backend attends exactly that mask
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~want, float("-inf"))
    dense = torch.nan_to_num(torch.softmax(scores, -1)) @ v
    torch.testing.assert_close(attend(q, k, v, sel, scale=0.3, backend="reference"), dense, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("n, block, n_cols, n_offs, zero", CASES[:4])
def test_conversion_equals_the_walk(n, block, n_cols, n_offs, zero):
    cols, offs = _random_sets(2, 2, n, n_cols, n_offs, seed=7 * n, zero=zero)
    starts, ends, gathered = vertical_slash_index(*kept_lists(cols, offs), n=n, block=block)
    for bi in range(2):
        for hi in range(2):
            vert = cols[bi, hi].nonzero().flatten().tolist()
            slash = sorted(offs[bi, hi].nonzero().flatten().tolist(), reverse=True)
            for qb in range(-(-n // block)):
                ranges, columns = minference_walk(vert, slash, (qb + 1) * block, block)
                got = [(int(s), int(e)) for s, e in zip(starts[bi, hi, qb], ends[bi, hi, qb]) if s >= 0]
                assert got == ranges
                assert [int(c) for c in gathered[bi, hi, qb] if c >= 0] == columns


# -- attention on the kernels against the reference --------------------------------


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, hq, hkv, block", [(300, 4, 2, 64), (257, 2, 1, 32), (128, 3, 3, 64)])
def test_native_forward_and_backward(n, hq, hkv, block, dtype):
    q, k, v, g = _inputs(2, hq, hkv, n, 16, 8, dtype, n)
    cols, offs = _random_sets(2, hq, n, 20, 2, seed=n, zero=False)
    sel = _fixed(VerticalSlashRanges(n, block=block), cols, offs).select(q, k)
    assert sel.kv_tokens.shape[-1] > 0  # gathered columns run as single key tokens
    padding = torch.rand(2, n, generator=g) < 0.1
    sinks = torch.randn(hq, generator=g, dtype=dtype).requires_grad_()
    _compare(q, k, v, sel)
    _compare(q, k, v, sel, padding=padding, softcap=1.7, sinks=sinks)


@needs_native
def test_native_on_the_selection_as_ranked():
    n = 500
    q, k, v, _ = _inputs(2, 4, 2, n, 16, 8, torch.float64, 3)
    sel = VerticalSlashRanges(n, vertical=8, slash=40, last_q=16, always_slash=0, min_slash=0).select(q, k)
    _compare(q, k, v, sel)


@needs_native
def test_native_tables_come_from_the_ranges(monkeypatch):
    import foveal.kernels.native.blocksparse as nb

    n, block = 700, 64
    q, k, _, _ = _inputs(1, 2, 2, n, 8, 8, torch.float32, 5)
    cols, offs = _random_sets(1, 2, n, 30, 12, seed=5, zero=True)
    sel = _fixed(VerticalSlashRanges(n, block=block), cols, offs).select(q, k)

    def no_elementwise(*a, **kw):
        raise AssertionError("a tile was evaluated elementwise")

    monkeypatch.setattr(nb, "_masks_of", no_elementwise)
    tabs = nb.selection_tables(sel, 2)
    assert tabs.tokens_causal and tabs.masks.shape[1:] == (block, 1)
    # the work: per range at most one tile more than its length in blocks, and the gathered columns
    starts, ends = sel.info["range_starts"], sel.info["range_ends"]
    row_end = torch.clamp((torch.arange(starts.shape[2]) + 1) * block, max=n)[:, None]
    length = (torch.minimum(ends, row_end) - starts).clamp(min=0) * (starts >= 0)
    bound = (-(-length // block) + (length > 0).long()).sum(-1)
    assert bool(((tabs.kv_blocks >= 0).sum(-1) <= bound).all())
    tokens = (sel.info["column_index"] >= 0).sum(-1)
    assert bool(((tabs.kv_tokens >= 0).sum(-1) <= tokens).all())


@pytest.mark.parametrize("n, block", [(150, 32), (64, 16), (200, 64)])
def test_eager_backends_equal_reference(n, block):
    q, k, v, _ = _inputs(2, 4, 2, n, 8, 8, torch.float32, block)
    cols, offs = _random_sets(2, 4, n, 6, 5, seed=block, zero=False)
    sel = _fixed(VerticalSlashRanges(n, block=block), cols, offs).select(q, k)
    ref = attend(q, k, v, sel, backend="reference", return_lse=True)
    out = attend(q, k, v, sel, backend="blocksparse", return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref[0])
    a = torch.autograd.grad((out[0] * g).sum(), (q, k, v))
    b = torch.autograd.grad((ref[0] * g).sum(), (q, k, v))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


# -- the C++ conversion and the torch fallback -------------------------------------


@needs_native
@pytest.mark.parametrize("seed", range(6))
def test_native_conversion_equals_torch_fallback(seed):
    g = torch.Generator().manual_seed(seed)
    n, block = int(torch.randint(1, 400, (1,), generator=g)), [16, 32, 64][seed % 3]
    b, h = 2, 3
    cols = torch.rand(b, h, n, generator=g) < float(torch.rand(1, generator=g))
    offs = torch.rand(b, h, n, generator=g) < 0.3 * float(torch.rand(1, generator=g))
    offs[0, 0] = False  # a head without offsets
    cols[1, 2] = False  # a head without columns
    vert, slash = kept_lists(cols, offs)
    got = native.ops().vertical_slash_index(vertical=vert, slash=slash, n=n, block=block)
    want = vertical_slash_index_torch(vert, slash, n, block)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_conversion_refuses_bad_input():
    vert = torch.zeros(1, 1, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="vertical"):
        vertical_slash_index(vert.int(), vert, n=4, block=2)
    with pytest.raises(ValueError, match="same"):
        vertical_slash_index(vert, torch.zeros(1, 2, 2, dtype=torch.int64), n=4, block=2)
    with pytest.raises(ValueError, match="block"):
        vertical_slash_index(vert, vert, n=4, block=0)
    with pytest.raises(ValueError, match="block must be at most 64"):
        VerticalSlashRanges(100, block=128)


# -- where the range form and the exact diagonals differ ----------------------------


def test_ranges_are_a_superset_where_no_column_is_dropped():
    n, block = 256, 64
    cols = torch.zeros(1, 1, n, dtype=torch.bool)
    offs = torch.zeros_like(cols)
    offs[0, 0, [0, 3, 100]] = True
    cols[0, 0, 5] = True  # before every range of the last query blocks: gathered, never dropped there
    q, k, _, _ = _inputs(1, 1, 1, n, 8, 8, torch.float32, 0)
    ranges = _fixed(VerticalSlashRanges(n), cols, offs).select(q, k).dense_mask()
    exact = _fixed(VerticalSlash(n), cols, offs).select(q, k).dense_mask()
    assert bool((exact & ~ranges)[..., 128:, :].sum() == 0) and bool((ranges & ~exact).any())
    # offset 100 of query block [192, 256) is the key range [92, 156): row 200 sees key 92 (offset 108, not kept)
    assert bool(ranges[0, 0, 200, 92]) and not bool(exact[0, 0, 200, 92])
    # offsets 3 and 0 there: [189, 253), then extended by a whole block to [189, 317) (cut causally)
    assert bool(ranges[0, 0, 250, 189]) and not bool(exact[0, 0, 250, 189])


def test_a_column_past_the_last_range_is_dropped():
    n, block = 320, 64
    cols = torch.zeros(1, 1, n, dtype=torch.bool)
    offs = torch.zeros_like(cols)
    offs[0, 0, 200] = True  # query block [256, 320): s = 120, the one range [56, 120)
    cols[0, 0, 150] = True  # at or after the last range's end: MInference never gathers it
    q, k, _, _ = _inputs(1, 1, 1, n, 8, 8, torch.float32, 0)
    sel = _fixed(VerticalSlashRanges(n), cols, offs).select(q, k)
    assert sel.info["range_starts"][0, 0, 4].tolist()[:1] == [56] and sel.info["range_ends"][0, 0, 4, 0] == 120
    exact = _fixed(VerticalSlash(n), cols, offs).select(q, k).dense_mask()
    assert bool(exact[0, 0, 300, 150]) and not bool(sel.dense_mask()[0, 0, 300, 150])
    assert bool(oracle_mask(cols, offs, n, block)[0, 0, 300, 150]) is False


def test_range_tiles_cover_each_range_with_aligned_tiles():
    starts = torch.tensor([[[[-1, -1], [-1, -1], [10, 100]]]])  # query block 2 only
    ends = torch.tensor([[[[-1, -1], [-1, -1], [74, 164]]]])
    columns = torch.tensor([[[[-1, -1], [-1, -1], [5, 80]]]])  # 80: in the tile [64, 128) both ranges touch
    kv, words, partial, tokens = range_tiles(starts, ends, columns, 192, 64)
    assert kv[0, 0, 2].tolist() == [0, 1, 2] and partial[0, 0, 2].tolist() == [True, True, True]
    assert (kv[0, 0, :2] < 0).all()

    def keys(tile):
        return [tile * 64 + c for c in range(64) if (int(words[0, 0, 2, tile]) >> c) & 1]

    assert keys(0) == [5] + list(range(10, 64))
    assert keys(1) == list(range(64, 74)) + [80] + list(range(100, 128))
    assert keys(2) == list(range(128, 164))
    assert tokens.shape[-1] == 0  # every gathered column here is inside a kept tile
