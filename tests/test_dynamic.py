"""Content-selected patterns vs independent definitions written here from the papers (loops, float64).

Each selector's kept columns / offsets / blocks are recomputed here from the
definition in MECHANISMS.md (B), the elementwise mask is built from them, and the
selection (its sets, block table, elementwise mask, statistics) and ``attend`` over
it (forward and backward, against dense masked softmax) are compared with that.
"""

import math
import random

import pytest
import torch

from foveal.functional import attend
from foveal.patterns.dynamic import DHSA, BlockCover, BlockTopK, VerticalSlash, VerticalSlashCover, a_shape
from foveal.patterns.vertical_slash_ranges import VerticalSlashRanges
from test_blocksparse import dense_attention

HEADS = [(4, 2), (3, 3), (2, 1)]


def _inputs(seed, hq, hkv, n, d=8, dtype=torch.float32, b=2):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype) for h in (hq, hkv, hkv))


def _ranked(scores, candidates):
    """Candidates by decreasing score (lower index first on ties)."""
    return sorted(candidates, key=lambda j: (-scores[j], j))


def _keep_forced_then_best(scores, candidates, forced, count):
    """The forced entries, then the best others until ``count`` are kept in all."""
    rest = [j for j in _ranked(scores, candidates) if j not in forced]
    return set(forced) | set(rest[: max(0, count - len(forced))])


def _keep_forced_first(scores, n, forced, count):
    """MInference's top-k after setting the first ``forced`` entries to +inf: those rank first
    (lower index first), then the others by decreasing score; ``count`` are kept."""
    head = list(range(min(forced, n)))
    return set((head + [j for j in _ranked(scores, range(n)) if j not in head])[:count])


def _cover(scores, alpha):
    """Smallest count whose largest scores sum to at least ``alpha`` of all."""
    srt = sorted(scores, reverse=True)
    total, acc = sum(srt), 0.0
    for c, s in enumerate(srt, 1):
        acc += s
        if acc >= alpha * total:
            return c
    return len(srt)


# -- vertical-slash ----------------------------------------------------------------------


def vertical_slash_reference(q, k, scale, last_q, fv, fs, counts):
    """Kept columns and offsets per (b, h) from the last queries' causal softmax, by loops."""
    b_, hq, n, _ = q.shape
    g = hq // k.shape[1]
    cols = torch.zeros(b_, hq, n, dtype=torch.bool)
    offs = torch.zeros(b_, hq, n, dtype=torch.bool)
    lq = min(last_q, n)
    for b in range(b_):
        for h in range(hq):
            kh = k[b, h // g].double()
            col, diag = [0.0] * n, [0.0] * n
            for i in range(n - lq, n):
                p = torch.softmax((kh[: i + 1] @ q[b, h, i].double()) * scale, 0)
                for j in range(i + 1):
                    col[j] += float(p[j])
                    diag[i - j] += float(p[j])
            nv, ns = counts(col, diag)
            for target, score, forced, count in ((cols, col, fv, nv), (offs, diag, fs, ns)):
                for j in _keep_forced_first(score, n, forced, count):
                    target[b, h, j] = True
    return cols, offs


def vertical_slash_mask(cols, offs):
    n = cols.shape[-1]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    diag = offs[..., (i - j).clamp(min=0)]  # (B, H, n, n)
    return (j <= i) & (cols[..., None, :] | diag)


def check_vertical_slash_layout(sel, cols, offs):
    """Whole blocks: those a kept diagonal passes through; single tokens: kept columns a query block sees elsewhere."""
    n, block = cols.shape[-1], sel.block
    blocks = blocks_of(vertical_slash_mask(torch.zeros_like(cols), offs), block)
    assert torch.equal(table_blocks(sel), blocks)
    b_, h_, nb, _ = blocks.shape
    for b in range(b_):
        for h in range(h_):
            for qb in range(nb):
                last = min(n, (qb + 1) * block) - 1
                expect = [j for j in range(n) if cols[b, h, j] and j <= last and not blocks[b, h, qb, j // block]]
                got = sorted(int(x) for x in sel.kv_tokens[b, h, qb] if x >= 0)
                assert got == expect
    assert torch.equal(sel.tokens_kept(), (sel.kv_tokens >= 0).sum((-1, -2)))


def table_blocks(sel):
    """The selection's block table as a (B, H, nb, nb) bool, by loops."""
    b_, h_, nb, s = sel.kv_blocks.shape
    out = torch.zeros(b_, h_, nb, nb, dtype=torch.bool)
    for b in range(b_):
        for h in range(h_):
            for qb in range(nb):
                kbs = [int(x) for x in sel.kv_blocks[b, h, qb] if x >= 0]
                assert kbs == sorted(set(kbs)), "each kept block listed once, ascending"
                out[b, h, qb, kbs] = True
    return out


def blocks_of(mask, block):
    """Block pairs holding at least one allowed (i, j)."""
    b_, h_, n, _ = mask.shape
    nb = -(-n // block)
    out = torch.zeros(b_, h_, nb, nb, dtype=torch.bool)
    for qb in range(nb):
        for kb in range(nb):
            out[:, :, qb, kb] = mask[:, :, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block].any((-1, -2))
    return out


def check_attend(pattern, q, k, v, mask, tol=1e-5):
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = attend(qr, kr, vr, pattern, return_lse=True)
    q2, k2, v2 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = dense_attention(q2, k2, v2, mask, 1 / math.sqrt(q.shape[-1]))
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = torch.autograd.grad((out.double() * go).sum(), (qr, kr, vr))
    theirs = torch.autograd.grad((ref_out * go).sum(), (q2, k2, v2))
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(a.double(), t, atol=10 * tol, rtol=10 * tol)


def check_selection(sel, mask, blocks=None):
    """The selection's elementwise rule, block table and statistics agree with the reference mask."""
    assert torch.equal(sel.dense_mask(), mask)
    if blocks is not None:
        assert torch.equal(table_blocks(sel), blocks)
    assert torch.equal(sel.keys_kept(), mask.sum((-1, -2)))
    assert torch.equal(sel.blocks_kept(), table_blocks(sel).sum((-1, -2)))
    torch.testing.assert_close(sel.density(), mask.sum((-1, -2)).double() / mask.shape[-1] ** 2)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("heads", HEADS)
def test_vertical_slash_matches_its_definition(seed, heads):
    rng = random.Random(seed)
    n, block = rng.randint(17, 50), rng.choice([4, 8])
    vertical, slash = rng.randint(0, n), rng.randint(0, n // 2)
    last_q, fv, fs = rng.choice([4, 8, 16]), rng.choice([0, 2, 5]), rng.choice([0, 1, 3, 8])
    min_v, min_s = rng.choice([0, 3, 60]), rng.choice([0, 2, 60])  # 60: more than n
    q, k, v = _inputs(seed, *heads, n)
    pat = VerticalSlash(n, vertical, slash, last_q=last_q, block=block, always_vertical=fv, always_slash=fs,
                        min_vertical=min_v, min_slash=min_s)
    sel = pat.select(q, k)
    cols, offs = vertical_slash_reference(
        q, k, 1 / math.sqrt(q.shape[-1]), last_q, fv, fs,
        lambda c, d: (min(max(vertical, min_v), n), min(max(slash, min_s), n)),
    )
    assert torch.equal(sel.info["columns"], cols)
    assert torch.equal(sel.info["offsets"], offs)
    mask = vertical_slash_mask(cols, offs)
    check_selection(sel, mask)
    check_vertical_slash_layout(sel, cols, offs)
    check_attend(pat, q, k, v, mask)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("heads", HEADS[:2])
def test_vertical_slash_cover_matches_its_definition(seed, heads):
    rng = random.Random(100 + seed)
    n, block = rng.randint(17, 50), rng.choice([4, 8])
    alpha, min_budget, last_q = rng.choice([0.3, 0.6, 0.9]), rng.choice([1, 4]), rng.choice([8, 16])
    fv, fs = rng.choice([0, 2]), rng.choice([0, 2])
    q, k, v = _inputs(seed, *heads, n)
    pat = VerticalSlashCover(n, alpha, min_budget, last_q=last_q, block=block, always_vertical=fv, always_slash=fs)
    sel = pat.select(q, k)

    def counts(col, diag):
        return (min(n, max(_cover(col, alpha), min_budget)), min(n, max(_cover(diag, alpha), min_budget)))

    cols, offs = vertical_slash_reference(q, k, 1 / math.sqrt(q.shape[-1]), last_q, fv, fs, counts)
    assert torch.equal(sel.info["columns"], cols)
    assert torch.equal(sel.info["offsets"], offs)
    mask = vertical_slash_mask(cols, offs)
    check_selection(sel, mask)
    check_vertical_slash_layout(sel, cols, offs)
    check_attend(pat, q, k, v, mask)


# -- block-level selectors ---------------------------------------------------------------


def pooled(x, b, h, block, root=False):
    """Per block: the mean of its tokens (times sqrt(size) when ``root``), by loops."""
    n = x.shape[2]
    out = []
    for s in range(0, n, block):
        rows = x[b, h, s:s + block].double()
        out.append(rows.mean(0) * (math.sqrt(rows.shape[0]) if root else 1.0))
    return out


def block_reference(q, k, block, causal, choose, root=False):
    """(B, H, nb, nb) kept blocks: ``choose(scores, allowed, qb)`` per query block, scores by pooled q·k."""
    b_, hq, n, _ = q.shape
    g = hq // k.shape[1]
    nb = -(-n // block)
    keep = torch.zeros(b_, hq, nb, nb, dtype=torch.bool)
    for b in range(b_):
        for h in range(hq):
            qp, kp = pooled(q, b, h, block, root), pooled(k, b, h // g, block, root)
            for qb in range(nb):
                allowed = [kb for kb in range(nb) if kb <= qb or not causal]
                scores = {kb: float(qp[qb] @ kp[kb]) for kb in allowed}
                keep[b, h, qb, sorted(choose(scores, allowed, qb))] = True
    return keep


def block_mask(keep, n, block, causal):
    """Tokens of kept blocks; causal inside when ``causal``."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    m = keep[..., i // block, j // block]
    return m & (j <= i) if causal else m


def _block_case(seed, heads):
    rng = random.Random(seed)
    n, block = rng.randint(17, 60), rng.choice([4, 8])
    return rng, n, block, _inputs(seed, *heads, n)


def _check_partial(sel, causal):
    qb = torch.arange(sel.num_blocks)[:, None]
    expect = (sel.kv_blocks == qb) & (sel.kv_blocks >= 0) if causal else None
    if causal:
        assert torch.equal(sel.partial, expect)
    else:
        assert sel.partial is None and sel.mask_fn is None


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("causal", [True, False])
def test_block_topk_matches_its_definition(seed, heads, causal):
    rng, n, block, (q, k, v) = _block_case(seed, heads)
    topk, sinks = rng.randint(1, 5), rng.choice([0, 1, 2])
    pat = BlockTopK(n, topk, block=block, sinks=sinks, causal=causal)
    sel = pat.select(q, k)

    def choose(scores, allowed, qb):
        forced = {qb} | {kb for kb in allowed if kb < sinks}
        return _keep_forced_then_best(scores, allowed, forced, min(topk, len(allowed)))

    keep = block_reference(q, k, block, causal, choose)
    mask = block_mask(keep, n, block, causal)
    check_selection(sel, mask, keep)
    _check_partial(sel, causal)
    check_attend(pat, q, k, v, mask)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("heads", HEADS[:2])
@pytest.mark.parametrize("causal", [True, False])
def test_block_cover_matches_its_definition(seed, heads, causal):
    rng, n, block, (q, k, v) = _block_case(10 + seed, heads)
    gamma, sinks = [0.2, 0.5, 0.9][seed], [2, 0, 1][seed]
    pat = BlockCover(n, gamma, block=block, sinks=sinks, causal=causal)
    sel = pat.select(q, k)
    scale = 1 / math.sqrt(q.shape[-1])

    def choose(scores, allowed, qb):
        z = max(scores.values())
        w = {kb: math.exp(scale * (s - z)) for kb, s in scores.items()}
        mass = {kb: x / sum(w.values()) for kb, x in w.items()}
        top = _ranked(mass, allowed)[: _cover([mass[kb] for kb in allowed], gamma)]
        return set(top) | {qb} | {kb for kb in allowed if kb < sinks}

    keep = block_reference(q, k, block, causal, choose)
    mask = block_mask(keep, n, block, causal)
    check_selection(sel, mask, keep)
    _check_partial(sel, causal)
    check_attend(pat, q, k, v, mask)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("causal", [True, False])
def test_dhsa_matches_its_definition(seed, heads, causal):
    rng, n, chunk, (q, k, v) = _block_case(20 + seed, heads)
    budget = rng.randint(1, n) if seed % 2 else chunk * rng.randint(1, -(-n // chunk))  # exact fits too
    pat = DHSA(n, budget, chunk=chunk, causal=causal)
    sel = pat.select(q, k)

    def size(c):
        return min(chunk, n - c * chunk)

    def choose(scores, allowed, qb):
        kept, spent = {qb}, size(qb)
        for kb in _ranked(scores, [kb for kb in allowed if kb != qb]):
            if spent + size(kb) > budget:
                break
            kept.add(kb)
            spent += size(kb)
        return kept

    keep = block_reference(q, k, chunk, causal, choose, root=True)
    mask = block_mask(keep, n, chunk, causal)
    check_selection(sel, mask, keep)
    _check_partial(sel, causal)
    check_attend(pat, q, k, v, mask)


# -- dtypes, A-shape, errors -------------------------------------------------------------


def test_bfloat16_inputs_select_and_attend_loosely():
    n = 40
    q, k, v = _inputs(3, 4, 2, n, dtype=torch.bfloat16)
    for pat in (VerticalSlash(n, 6, 5, last_q=8, block=8, always_vertical=2, always_slash=2, min_vertical=0,
                              min_slash=0), BlockTopK(n, 2, block=8)):
        sel = pat.select(q, k)
        mask = sel.dense_mask()
        if isinstance(pat, VerticalSlash):  # the selection agrees with the definition on the same values
            cols, offs = vertical_slash_reference(q, k, 1 / math.sqrt(8), 8, 2, 2, lambda c, d: (6, 5))
            assert torch.equal(mask, vertical_slash_mask(cols, offs))
        check_attend(pat, q, k, v, mask, tol=3e-2)


@pytest.mark.parametrize("n,sinks,local", [(30, 3, 5), (30, 0, 7), (12, 100, 800), (25, 4, 0), (20, 2, 1), (9, 0, 9)])
def test_a_shape_matches_its_definition(n, sinks, local):
    # MInference's streaming kernel: local keys 0 <= i - j < n_local, and the first n_init keys (j <= i)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = j <= i and (i - j < local or j < sinks)
    p = a_shape(n, sinks, local)
    assert torch.equal(p.dense_mask(), m)
    if n > local > 0 and sinks == 0:
        assert int(p.dense_mask()[-1].sum()) == local  # `local` window keys, the query's own included


def test_a_shape_without_any_key_is_refused():
    with pytest.raises(ValueError, match="sinks >= 1 or local >= 1"):
        a_shape(10, 0, 0)


def test_vertical_slash_defaults_are_minferences():
    # vertical_and_slash_kernel: sizes raised to >= 30 columns / >= 50 offsets, the first 30 columns and the
    # 100 nearest offsets ranked first (+inf), the last 64 queries estimate
    n = 300
    q, k, _ = _inputs(4, 2, 1, n, b=1)
    sel = VerticalSlash(n, vertical=0, slash=0).select(q, k)
    cols, offs = sel.info["columns"][0, 0], sel.info["offsets"][0, 0]
    assert torch.nonzero(cols).flatten().tolist() == list(range(30))
    assert torch.nonzero(offs).flatten().tolist() == list(range(50))  # 50 of the 100 forced: the nearest
    sel = VerticalSlash(n, vertical=40, slash=150).select(q, k)
    cols, offs = sel.info["columns"][0, 0], sel.info["offsets"][0, 0]
    assert int(cols.sum()) == 40 and bool(cols[:30].all())
    assert int(offs.sum()) == 150 and bool(offs[:100].all())
    want, _ = vertical_slash_reference(q, k, 1 / math.sqrt(8), 64, 30, 100, lambda c, d: (40, 150))
    assert torch.equal(sel.info["columns"], want)


def test_selection_runs_without_gradients_and_attend_gives_them():
    n = 24
    q, k, v = (t.requires_grad_() for t in _inputs(0, 2, 2, n))
    sel = BlockTopK(n, 2, block=4).select(q, k)
    assert not sel.kv_blocks.requires_grad
    attend(q, k, v, BlockTopK(n, 2, block=4)).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_bad_arguments_are_refused_with_the_value():
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        VerticalSlash(0)
    with pytest.raises(ValueError, match="vertical must be >= 0, got -1"):
        VerticalSlash(16, -1)
    with pytest.raises(TypeError, match="topk must be an int"):
        BlockTopK(16, 2.5)
    with pytest.raises(ValueError, match=r"gamma must be a number in \(0, 1\], got 1.5"):
        BlockCover(16, 1.5)
    with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\], got 0"):
        VerticalSlashCover(16, 0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        DHSA(16, 8, causal="yes")
    with pytest.raises(ValueError, match="causal must be True: vertical-slash is defined for causal attention, got False"):
        VerticalSlashCover(16, causal=False)
    q, k, v = _inputs(0, 2, 1, 16)
    with pytest.raises(ValueError, match="q has 16 tokens but"):
        BlockTopK(20, 2).select(q, k)
    with pytest.raises(ValueError, match="4-D"):
        BlockTopK(16, 2).select(q[0], k)
    with pytest.raises(ValueError, match="query heads must be a multiple of key/value heads"):
        BlockTopK(16, 2).select(k, q)
    with pytest.raises(ValueError, match="pattern"):
        attend(q, k, v, BlockTopK(20, 2))


@pytest.mark.parametrize("make", [
    lambda n: VerticalSlash(n, 7, 5, last_q=8, block=8, always_vertical=2, always_slash=2),
    lambda n: VerticalSlashCover(n, 0.5, 2, last_q=8, block=8),
    lambda n: VerticalSlashRanges(n, 7, 3, last_q=8, block=8, always_vertical=2, always_slash=0, min_slash=0),
    lambda n: BlockTopK(n, 2, block=8),
    lambda n: BlockCover(n, 0.5, block=8, causal=False),
    lambda n: DHSA(n, 20, chunk=8),
])
def test_selection_in_slices_equals_selection_at_once(make, monkeypatch):
    import foveal.patterns.dynamic as dyn

    n = 37
    q, k, v = _inputs(5, 4, 2, n, b=3)
    whole = make(n).select(q, k)
    monkeypatch.setattr(dyn, "SELECT_ELEMENTS", 1)  # one batch element and one key head at a time
    sliced = make(n).select(q, k)
    assert torch.equal(sliced.dense_mask(), whole.dense_mask())
    assert torch.equal(table_blocks(sliced), table_blocks(whole))
    assert sliced.info.keys() == whole.info.keys()
    for name in whole.info:
        assert torch.equal(sliced.info[name], whole.info[name])
    torch.testing.assert_close(attend(q, k, v, sliced), attend(q, k, v, whole))


def test_nothing_kept_gives_zero_output_and_minus_inf_lse():
    n = 20
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, n))
    pat = VerticalSlash(n, 0, 0, block=8, always_vertical=0, always_slash=0, min_vertical=0, min_slash=0)
    sel = pat.select(q, k)
    assert not sel.dense_mask().any() and (sel.keys_kept() == 0).all() and (sel.blocks_kept() == 0).all()
    out, lse = attend(q, k, v, pat, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert (q.grad == 0).all() and (k.grad == 0).all()
