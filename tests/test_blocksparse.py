"""blocksparse kernel vs dense masked softmax, with the selected elementwise mask materialised here by loops."""

import math
import random

import pytest
import torch

import foveal.kernels.blocksparse as bsk
from foveal.functional import attend
from foveal.kernels.blocksparse import blocksparse_attention
from foveal.patterns.dynamic import BlockSelection


def dense_attention(q, k, v, mask, scale):
    """Masked softmax attention in float64 from the definition; rows with no allowed key give 0 and lse -inf.

    ``mask`` (B, Hq, Nq, Nk); query head h uses key head h // (Hq // Hkv).
    """
    g = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    return p @ vv, lse


def mask_from_table(table, partial, fn, n_q, n_kv, block):
    """The allowed (b, h, i, j) of a block table, by loops over every kept slot."""
    b, h, nqb, s = table.shape
    m = torch.zeros(b, h, n_q, n_kv, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for qb in range(nqb):
                for t in range(s):
                    kb = int(table[bi, hi, qb, t])
                    if kb < 0:
                        continue
                    rows = slice(qb * block, min((qb + 1) * block, n_q))
                    cols = slice(kb * block, min((kb + 1) * block, n_kv))
                    masked = fn is not None and (partial is None or bool(partial[bi, hi, qb, t]))
                    if masked:
                        i = torch.arange(rows.start, rows.stop)[:, None]
                        j = torch.arange(cols.start, cols.stop)[None, :]
                        allowed = torch.as_tensor(fn(bi, hi, i, j))
                        m[bi, hi, rows, cols] = torch.broadcast_to(allowed, (i.numel(), j.numel()))
                    else:
                        m[bi, hi, rows, cols] = True
    return m


def _random_table(rng, b, h, nqb, nkb, slots, empty_rows=True):
    """Distinct key blocks per row in random order with -1 scattered among them; some rows empty."""
    table = torch.full((b, h, nqb, slots), -1, dtype=torch.int64)
    for idx in range(b * h * nqb):
        bi, hi, qb = idx // (h * nqb), (idx // nqb) % h, idx % nqb
        count = rng.randint(0 if empty_rows else 1, min(slots, nkb))
        pos = rng.sample(range(slots), count)
        for p, kb in zip(pos, rng.sample(range(nkb), count)):
            table[bi, hi, qb, p] = kb
    return table


def _case(seed, dtype=torch.float32, hq=4, hkv=2, dv=None, n_kv=None):
    rng = random.Random(seed)
    b, block, d = 2, rng.choice([4, 8]), rng.choice([8, 16])
    n_q = rng.randint(2 * block + 1, 5 * block - 1)
    n_kv = n_q if n_kv is None else n_kv
    nqb, nkb = -(-n_q // block), -(-n_kv // block)
    table = _random_table(rng, b, hq, nqb, nkb, slots=rng.randint(1, nkb + 1))
    partial = torch.rand(b, hq, nqb, table.shape[-1], generator=torch.Generator().manual_seed(seed)) < 0.5
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(b, hq, n_q, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, n_kv, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, n_kv, dv or d, generator=g).to(dtype)
    return q, k, v, table, partial, block


def _fn(b, h, i, j):
    # an elementwise rule that reads every index: causal-ish with a batch/head twist
    return (j <= i + h) & ((i * 3 + j + b) % 4 != 0)


def _grads(out, lse, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    finite = torch.isfinite(lse)
    loss = (out.double() * go).sum() + (torch.where(finite, lse.double(), 0.0) * gl).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)])
def test_matches_dense_reference_forward_and_backward(seed, heads):
    hq, hkv = heads
    q, k, v, table, partial, block = _case(seed, hq=hq, hkv=hkv, dv=6 if seed % 2 else None)
    mask = mask_from_table(table, partial, _fn, q.shape[2], k.shape[2], block)
    scale = 0.7
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = blocksparse_attention(qr, kr, vr, table, block, scale, partial=partial, mask_fn=_fn)
    q2, k2, v2 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = dense_attention(q2, k2, v2, mask, scale)
    assert out.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(_grads(out, lse, (qr, kr, vr), seed), _grads(ref_out, ref_lse, (q2, k2, v2), seed)):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-4, rtol=1e-4)


def test_without_mask_fn_attends_whole_blocks_and_ragged_edges_are_cut():
    q, k, v, table, _, block = _case(7)
    mask = mask_from_table(table, None, None, q.shape[2], k.shape[2], block)
    out, lse = blocksparse_attention(q, k, v, table, block, 0.5)
    ref_out, ref_lse = dense_attention(q, k, v, mask, 0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_cross_lengths_and_small_chunks(monkeypatch):
    # many chunks (one instance each), fewer keys than queries, mask on every slot
    monkeypatch.setattr(bsk, "SCORE_ELEMENTS", 1)
    q, k, v, table, _, block = _case(3, n_kv=13)
    mask = mask_from_table(table, None, _fn, q.shape[2], k.shape[2], block)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = blocksparse_attention(qr, kr, vr, table, block, 0.3, mask_fn=_fn)
    q2, k2, v2 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = dense_attention(q2, k2, v2, mask, 0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(_grads(out, lse, (qr, kr, vr), 1), _grads(ref_out, ref_lse, (q2, k2, v2), 1)):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-4, rtol=1e-4)


def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_grads():
    q, k, v, table, partial, block = _case(5)
    table[0, 1] = -1  # no key block at all for (batch 0, head 1)
    table[1, 0, 0] = -1
    never = lambda b, h, i, j: (j < 0) & (i >= 0)  # noqa: E731 (a partial slot that allows nothing)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = blocksparse_attention(qr, kr, vr, table, block, 0.5, partial=partial, mask_fn=never)
    mask = mask_from_table(table, partial, never, q.shape[2], k.shape[2], block)
    dead = ~mask.any(-1)
    assert dead[0, 1].all() and dead[1, 0, :block].all()
    assert not torch.isnan(out).any()
    assert (out[dead] == 0).all() and torch.isneginf(lse[dead]).all()
    out.sum().backward()
    assert (qr.grad[dead] == 0).all() and not torch.isnan(qr.grad).any()
    ref_out, ref_lse = dense_attention(q, k, v, mask, 0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


def test_bfloat16_loosely_and_float64_tightly():
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float64, 1e-10)):
        q, k, v, table, partial, block = _case(11, dtype=dtype)
        mask = mask_from_table(table, partial, _fn, q.shape[2], k.shape[2], block)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = blocksparse_attention(qr, kr, vr, table, block, 0.4, partial=partial, mask_fn=_fn)
        assert out.dtype == dtype
        q2, k2, v2 = (t.double().requires_grad_() for t in (q, k, v))
        ref_out, ref_lse = dense_attention(q2, k2, v2, mask, 0.4)
        torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
        ours = _grads(out, lse, (qr, kr, vr), 2)
        for a, t in zip(ours, _grads(ref_out, ref_lse, (q2, k2, v2), 2)):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), t, atol=tol * 4, rtol=tol * 4)


def test_attend_accepts_a_block_selection_and_checks_it():
    q, k, v, table, partial, block = _case(2)
    n = q.shape[2]
    sel = BlockSelection(n, block, table, partial, _fn, "test")
    mask = mask_from_table(table, partial, _fn, n, n, block)
    assert torch.equal(sel.dense_mask(), mask)
    assert torch.equal(sel.keys_kept(), mask.sum((-1, -2)))
    out, lse = attend(q, k, v, sel, return_lse=True)
    ref_out, ref_lse = dense_attention(q, k, v, mask, 1 / math.sqrt(q.shape[-1]))
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        attend(q, k, v, sel, backend="cpu")
    def term(h, i, j):  # a score term now runs with selections too
        return 0.01 * (i - j) * (h + 1)

    torch.testing.assert_close(attend(q, k, v, sel, bias=term), attend(q, k, v, sel, bias=term, backend="reference"),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(batch, heads\)"):
        attend(q[:1], k[:1], v[:1], sel)
    with pytest.raises(ValueError, match="tokens"):
        attend(q[:, :, :-1], k, v, sel)


def test_bad_tables_are_refused():
    q, k, v, table, partial, block = _case(0)
    with pytest.raises(ValueError, match="kv_blocks must have shape"):
        blocksparse_attention(q, k, v, table[:, :, :-1], block, 1.0)
    with pytest.raises(ValueError, match="key blocks in"):
        blocksparse_attention(q, k, v, table + 100, block, 1.0)
    with pytest.raises(TypeError, match="kv_blocks must be an int32/int64"):
        blocksparse_attention(q, k, v, table.float(), block, 1.0)
    with pytest.raises(ValueError, match="block must be a positive int"):
        blocksparse_attention(q, k, v, table, 0, 1.0)
    with pytest.raises(ValueError, match="partial must be a bool"):
        blocksparse_attention(q, k, v, table, block, 1.0, partial=partial.int(), mask_fn=_fn)


@pytest.mark.parametrize("seed", range(3))
def test_single_key_tokens_besides_blocks(seed):
    # vertical-slash style: blocks plus single tokens outside them, all masked by mask_fn
    q, k, v, table, partial, block = _case(30 + seed, hq=4, hkv=2)
    rng = random.Random(seed)
    b, h, nqb, _ = table.shape
    n = q.shape[2]
    width = rng.randint(1, 6)
    tokens = torch.full((b, h, nqb, width), -1, dtype=torch.int64)
    mask = mask_from_table(table, partial, _fn, n, n, block)
    for bi in range(b):
        for hi in range(h):
            for qb in range(nqb):
                outside = [j for j in range(n) if j // block not in table[bi, hi, qb].tolist()]
                for slot, j in zip(rng.sample(range(width), width), rng.sample(outside, min(width, len(outside)))):
                    if rng.random() < 0.8:
                        tokens[bi, hi, qb, slot] = j
                        i = torch.arange(qb * block, min(n, (qb + 1) * block))
                        mask[bi, hi, i, j] = torch.as_tensor(_fn(bi, hi, i, j))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = blocksparse_attention(qr, kr, vr, table, block, 0.6, partial=partial, mask_fn=_fn, kv_tokens=tokens)
    q2, k2, v2 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = dense_attention(q2, k2, v2, mask, 0.6)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(_grads(out, lse, (qr, kr, vr), seed), _grads(ref_out, ref_lse, (q2, k2, v2), seed)):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="kv_tokens entries"):
        blocksparse_attention(q, k, v, table, block, 0.6, kv_tokens=tokens + n)


@pytest.mark.parametrize("seed", [1])
def test_selection_block_mask_for_flex_attention(seed):
    # per-(batch, head) BlockMask: eager FlexAttention over it equals the dense reference
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    from foveal.kernels.blocksparse import selection_block_mask

    q, k, v, table, partial, block = _case([40, 43][seed], hq=4, hkv=2)  # even and ragged
    n = q.shape[2]
    mask = mask_from_table(table, partial, _fn, n, n, block)
    tokens = torch.full(table.shape[:3] + (1,), -1, dtype=torch.int64)
    for bi, hi, qb in [(0, 0, 0), (1, 3, table.shape[2] - 1)]:
        free = [j for j in range(n) if j // block not in table[bi, hi, qb].tolist()]
        if free:
            j = free[len(free) // 2]
            tokens[bi, hi, qb, 0] = j
            i = torch.arange(qb * block, min(n, (qb + 1) * block))
            mask[bi, hi, i, j] = torch.as_tensor(_fn(bi, hi, i, j))
    sel = BlockSelection(n, block, table, partial, _fn, "test", kv_tokens=tokens)
    bm = selection_block_mask(sel)
    # the tables, by loops: listed non-partial blocks are full unless on a ragged edge; the rest partial
    nb = table.shape[2]
    for bi in range(table.shape[0]):
        for hi in range(table.shape[1]):
            for qb in range(nb):
                full, part = set(), set()
                for t, kb in enumerate(table[bi, hi, qb].tolist()):
                    ragged = n % block and (qb == nb - 1 or kb == nb - 1)
                    if kb >= 0:
                        (part if partial[bi, hi, qb, t] or ragged else full).add(kb)
                part |= {j // block for j in tokens[bi, hi, qb].tolist() if j >= 0}
                got_part = bm.kv_indices[bi, hi, qb, : bm.kv_num_blocks[bi, hi, qb]].tolist()
                got_full = bm.full_kv_indices[bi, hi, qb, : bm.full_kv_num_blocks[bi, hi, qb]].tolist()
                assert (sorted(got_part), sorted(got_full)) == (sorted(part), sorted(full))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=bm, scale=0.5, enable_gqa=True)
    ref, ref_lse = dense_attention(q, k, v, mask, 0.5)
    alive = torch.isfinite(ref_lse)
    torch.testing.assert_close(out.double()[alive], ref[alive], atol=1e-5, rtol=1e-5)
