"""KVCache / attend_decode: token-by-token decoding equals the full computation; eviction keeps the
cache bounded; Quest and SnapKV selections against plain-loop implementations; errors."""

import math
import random

import pytest
import torch

import bruteforce as bf
from precision import attention_tol32
from foveal.decode import (
    KVCache,
    Quest,
    SnapKV,
    attend_decode,
    future_visible,
    snapkv_compress,
    snapkv_scores,
    snapkv_select,
)
from foveal.functional import attend
from foveal.patterns import (
    Causal,
    Dilated,
    Document,
    Full,
    GlobalTokens,
    MaskPattern,
    Pattern,
    Power,
    PrefixLM,
    Sinks,
    SlidingWindow,
    Strided,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_attention(q, k, v, mask, scale=None):
    """Masked softmax attention written out: q (B,H,M,D), k/v (B,Hkv,S,D), mask broadcastable to (B,H,M,S)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = q.float() @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def causal_sinks(n, count):
    """StreamingLLM's sinks, written out: key j < count, never a later one."""
    return torch.tensor([[j < count and j <= i for j in range(n)] for i in range(n)])


# name -> (pattern factory, brute-force mask factory); every decoding pattern is causal
PATTERNS = {
    "causal": (lambda n: Causal(n), lambda n: bf.causal(n)),
    "window": (lambda n: SlidingWindow(n, 5), lambda n: bf.sliding_window(n, 5, 0, 1)),
    "window_dilated": (lambda n: SlidingWindow(n, 9, dilation=3), lambda n: bf.sliding_window(n, 9, 0, 3)),
    "sinks_window": (
        lambda n: Sinks(n, 3) | SlidingWindow(n, 6),
        lambda n: causal_sinks(n, 3) | bf.sliding_window(n, 6, 0, 1),
    ),
    "causal_window_sinks": (
        lambda n: Causal(n) & (SlidingWindow(n, 4) | Sinks(n, 2)),
        lambda n: bf.causal(n) & (bf.sliding_window(n, 4, 0, 1) | causal_sinks(n, 2)),
    ),
    "strided": (lambda n: Strided(n, 3) & Causal(n), lambda n: bf.strided(n, 3) & bf.causal(n)),
    "dilated": (lambda n: Dilated(n, (8, 16), (2, 4)) & Causal(n),
                lambda n: bf.dilated(n, [(8, 2), (16, 4)]) & bf.causal(n)),
    "power": (lambda n: Power(n, 4), lambda n: bf.power(n, 4, 1, 1)),
    # a pattern without a closed-form rule: the exact default of visible_later evicts
    "document": (lambda n: Document([n // 3, n - n // 3], Causal),
                 lambda n: bf.document([n // 3, n - n // 3], lambda i, j, L: j <= i)),
}


def _schedule(rng, n, chunked):
    steps, t = [], 0
    while t < n:
        m = min(n - t, rng.randint(1, 4) if chunked else 1)
        steps.append((t, t + m))
        t += m
    return steps


def _decode(q, k, v, pattern, steps, **kw):
    cache = KVCache(k.shape[0], k.shape[1], k.shape[3], dtype=k.dtype, pattern=pattern, **kw)
    outs, lses, sizes = [], [], []
    for a, b in steps:
        cache.append(k[:, :, a:b], v[:, :, a:b])
        sizes.append(cache.size)
        out, lse = attend_decode(q[:, :, a:b], cache, return_lse=True)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2), sizes


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_decoding_equals_full_attention(name, chunked):
    rng = random.Random(hash((name, chunked)) % 1000)
    n = rng.randint(24, 40)
    make, brute = PATTERNS[name]
    pattern = make(n)
    b, hq, hkv, d = 2, 4, 2, 8
    q, k, v = (torch.randn(b, h, n, d) for h in (hq, hkv, hkv))
    out, lse, _ = _decode(q, k, v, pattern, _schedule(rng, n, chunked))
    mask = brute(n)
    assert not mask.triu(1).any()  # the definitions themselves are causal
    want, want_lse = dense_attention(q, k, v, mask)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    # and the library's own full computation with the same pattern
    torch.testing.assert_close(out, attend(q, k, v, pattern), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, None), (torch.float64, 1e-12)])
def test_streaming_llm_token_by_token_equals_attend(dtype, tol):
    # the README's StreamingLLM pattern: decoding it one token at a time is attend over the whole sequence,
    # including the first queries, which must not see sinks later than themselves
    n, w = 41, 6
    pattern = SlidingWindow(n, w) | Sinks(n, 4)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, n, 16, generator=g, dtype=dtype) for h in (6, 2, 2))
    out, lse, sizes = _decode(q, k, v, pattern, [(t, t + 1) for t in range(n)])
    assert max(sizes) == 4 + w + 1
    tol = tol or attention_tol32(q, k, v, max(sizes))  # float32: one call's rounding, derived (tests/precision.py)
    full, full_lse = attend(q, k, v, pattern, return_lse=True)
    torch.testing.assert_close(out, full, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, full_lse.to(lse.dtype), atol=tol, rtol=tol)
    want, _ = dense_attention(q, k, v, causal_sinks(n, 4) | bf.sliding_window(n, w, 0, 1))  # float32 loop
    torch.testing.assert_close(out.float(), want, atol=1e-5, rtol=1e-5)


def test_sinks_and_window_cache_stays_bounded():
    n, sinks, left = 80, 4, 8
    pattern = Sinks(n, sinks) | SlidingWindow(n, left)
    q, k, v = (torch.randn(2, h, n, 8) for h in (2, 1, 1))
    steps = _schedule(random.Random(1), n, chunked=True)  # chunks of 1..4 tokens
    out, _, sizes = _decode(q, k, v, pattern, steps, capacity=sinks + left + 4)
    for (a, b), size in zip(steps, sizes):
        # exactly the sinks, the window of the first new query, and the new tokens
        assert size == len(set(range(min(sinks, a))) | set(range(max(0, a - left), a))) + (b - a)
    assert max(sizes) <= sinks + left + 4
    want, _ = dense_attention(q, k, v, causal_sinks(n, sinks) | bf.sliding_window(n, left, 0, 1))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    cache = KVCache(2, 1, 8, pattern=pattern, capacity=sinks + left)
    with pytest.raises(ValueError, match="cache capacity 12 is too small"):
        for a in range(n):
            cache.append(k[:, :, a : a + 1], v[:, :, a : a + 1])


@pytest.mark.parametrize("name", sorted(PATTERNS) + ["sinks_alone", "window_right"])
def test_sees_kept_keys_is_exact(name):
    # where a pattern says so, the query at t sees key t and every earlier key some query i >= t sees: a cache
    # evicted for t decodes it with no mask
    n = 29
    if name == "sinks_alone":
        pattern, mask = Sinks(n, 3), causal_sinks(n, 3)
    elif name == "window_right":  # not causal, so it never decodes; the rule still must not claim it
        pattern, mask = SlidingWindow(n, 3, 2), bf.sliding_window(n, 3, 2, 1)
    else:
        pattern, mask = PATTERNS[name][0](n), PATTERNS[name][1](n)
    holds = all(bool(mask[t, t]) and all(bool(mask[t, j]) for j in range(t) if mask[t:, j].any())
                for t in range(n))
    assert holds or not pattern.sees_kept_keys()  # sound; it may say False where it holds (then a mask runs)
    assert pattern.sees_kept_keys() == (name in ("causal", "window", "sinks_window", "causal_window_sinks"))


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_visible_later_is_exact(name):
    n = 37
    pattern, mask = PATTERNS[name][0](n), PATTERNS[name][1](n)
    for t in range(0, n + 1):
        keys = torch.arange(n)
        want = torch.tensor([bool(mask[t:, j].any()) for j in range(n)])
        assert torch.equal(pattern.visible_later(keys, t), want), t
    with pytest.warns(DeprecationWarning, match="visible_later"):
        assert torch.equal(future_visible(pattern, torch.arange(5), 5), pattern.visible_later(torch.arange(5), 5))


def test_eviction_asks_the_pattern():
    # a pattern class decode.py knows nothing of: the cache still evicts exactly what no later query sees
    class Band(Pattern):
        def __init__(self, n, width):
            self._set(shape=(n,), width=width)

        def mask(self, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < self.width)

        def _key(self):
            return (self.shape, self.width)

    n = 30
    cache = KVCache(1, 1, 4, pattern=Band(n, 3))
    k = torch.randn(1, 1, n, 4)
    for t in range(n):
        cache.append(k[:, :, t : t + 1], k[:, :, t : t + 1])
        assert cache.positions[0, 0].tolist() == list(range(max(0, t - 2), t + 1))


@pytest.mark.parametrize(
    "make",
    [
        lambda n: Full(n),
        lambda n: Strided(n, 3),
        lambda n: SlidingWindow(n, 4, right=1),
        lambda n: GlobalTokens(n, 2),
        lambda n: PrefixLM(n, 3),
        lambda n: Dilated(n, 8, 2),
        lambda n: MaskPattern(n, lambda i, j: j < 4, name="old_sinks"),  # sinks as they were: j < 4 for every i
        lambda n: SlidingWindow(n, 4) | MaskPattern(n, lambda i, j: (j == i + 1) & (i == n - 2), name="one"),
    ],
)
def test_non_causal_patterns_are_refused(make):
    n = 24
    pattern = make(n)
    assert bool(pattern.dense_mask().triu(1).any())  # some query sees a later key
    with pytest.raises(ValueError, match="pattern must be causal for decoding"):
        KVCache(1, 1, 4, pattern=pattern)
    cache = KVCache(1, 1, 4)
    cache.append(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="pattern must be causal for decoding"):
        attend_decode(torch.randn(1, 1, 1, 4), cache, pattern)
    # the same pattern made causal decodes
    attend_decode(torch.randn(1, 1, 1, 4), cache, pattern & Causal(n))


def test_causal_patterns_of_other_classes_are_accepted():
    n = 24
    for pattern in (PrefixLM(n, 1), PrefixLM(n, 0), Sinks(n, 5), Power(n, 3), MaskPattern(n, lambda i, j: j == i)):
        assert not bool(pattern.dense_mask().triu(1).any())
        KVCache(1, 1, 4, pattern=pattern)


def test_dtype_and_device_mismatches_follow_one_policy():
    cache = KVCache(2, 1, 8)
    cache.append(torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8))
    with pytest.raises(TypeError, match="q must have the cache's dtype torch.float32, got torch.float64"):
        attend_decode(torch.randn(2, 2, 1, 8, dtype=torch.float64), cache)
    with pytest.raises(ValueError, match="q must be on the cache's device cpu, got meta"):
        attend_decode(torch.randn(2, 2, 1, 8, device="meta"), cache)
    with pytest.raises(ValueError, match="k must be on the cache's device cpu, got meta"):
        cache.append(torch.randn(2, 1, 1, 8, device="meta"), torch.randn(2, 1, 1, 8, device="meta"))
    with pytest.raises(TypeError, match="q must have one of the dtypes"):
        attend_decode(torch.zeros(2, 2, 1, 8, dtype=torch.int64), cache)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        attend_decode([1.0], cache)
    with pytest.raises(TypeError, match="k must have one of the dtypes"):
        cache.append(torch.zeros(2, 1, 1, 8, dtype=torch.int32), torch.zeros(2, 1, 1, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="q and k must share one dtype"):
        snapkv_select(torch.randn(2, 2, 4, 8), torch.randn(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        snapkv_scores(torch.randn(2, 2, 4, 8), torch.randn(2, 1, 8, 8), SnapKV(), scale=-1.0)


def test_bfloat16_decoding_and_gradient_to_q():
    n, pattern = 30, Sinks(30, 2) | SlidingWindow(30, 7)
    q, k, v = (torch.randn(2, h, n, 16) for h in (4, 2, 2))
    mask = causal_sinks(n, 2) | bf.sliding_window(n, 7, 0, 1)
    want, _ = dense_attention(q, k, v, mask)
    out, _, _ = _decode(q.bfloat16(), k.bfloat16(), v.bfloat16(), pattern, _schedule(random.Random(2), n, True))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
    # backward through one decode step reaches q
    cache = KVCache(2, 2, 16, pattern=pattern)
    cache.append(k[:, :, :27], v[:, :, :27])
    qn = q[:, :, 24:27].clone().requires_grad_()
    g = torch.randn(2, 4, 3, 16)
    (gq,) = torch.autograd.grad(attend_decode(qn, cache), qn, g)
    qr = q[:, :, 24:27].clone().requires_grad_()
    (gr,) = torch.autograd.grad(dense_attention(qr, k[:, :, :27], v[:, :, :27], mask[24:27, :27])[0], qr, g)
    torch.testing.assert_close(gq, gr, atol=1e-5, rtol=1e-5)


# -- Quest --------------------------------------------------------------------------
def quest_loop(qvec, keys, pos, page, budget):
    """Quest pages for one query (list of floats per dim) over keys (list of rows), by loops."""
    cur = pos // page
    bounds = []
    for p in range(cur):
        rows = keys[p * page : (p + 1) * page]
        lo = [min(r[d] for r in rows) for d in range(len(qvec))]
        hi = [max(r[d] for r in rows) for d in range(len(qvec))]
        bounds.append((sum(max(qvec[d] * lo[d], qvec[d] * hi[d]) for d in range(len(qvec))), p))
    top = sorted(p for _, p in sorted(bounds, reverse=True)[: budget // page])
    return top, [j for p in top for j in range(p * page, (p + 1) * page)] + list(range(cur * page, pos + 1))


@pytest.mark.parametrize("chunk", [1, 3])
def test_quest_selection_and_output(chunk):
    b, hq, hkv, d, n, page, budget = 2, 4, 2, 8, 45, 4, 12
    q, k, v = (torch.randn(b, h, n, d) for h in (hq, hkv, hkv))
    cache = KVCache(b, hkv, d)
    quest = Quest(page_size=page, token_budget=budget)
    for a in range(0, n, chunk):
        e = min(n, a + chunk)
        cache.append(k[:, :, a:e], v[:, :, a:e])
        out, kept = attend_decode(q[:, :, a:e], cache, select=quest, return_kept=True)
        mask = torch.zeros(b, hq, e - a, e, dtype=torch.bool)
        for i, pos in enumerate(range(a, e)):
            assert kept[i]["position"] == pos
            for bb in range(b):
                for h in range(hq):
                    pages, keys = quest_loop(q[bb, h, pos].tolist(), k[bb, h // 2, :e].tolist(), pos, page, budget)
                    assert kept[i]["pages"][bb, h].tolist() == pages
                    assert kept[i]["num_keys"] == len(keys)
                    mask[bb, h, i, keys] = True
        want, _ = dense_attention(q[:, :, a:e], k[:, :, :e], v[:, :, :e], mask)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_quest_with_a_large_budget_is_causal_attention():
    q, k, v = (torch.randn(2, h, 20, 8) for h in (2, 1, 1))
    cache = KVCache(2, 1, 8)
    cache.append(k, v)
    out = attend_decode(q[:, :, -3:], cache, select=Quest(page_size=4, token_budget=64))
    want, _ = dense_attention(q, k, v, bf.causal(20))
    torch.testing.assert_close(out, want[:, :, -3:], atol=1e-5, rtol=1e-5)


# -- SnapKV -------------------------------------------------------------------------
def snapkv_loop(q, k, cfg, scale):
    """SnapKV kept indices per (batch, kv head), by loops over the definition."""
    b, hq, nq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    w = min(cfg.window, nq)
    kept = []
    for bb in range(b):
        row = []
        for hk in range(hkv):
            vote = [-math.inf] * length
            for h in range(hk * (hq // hkv), (hk + 1) * (hq // hkv)):
                acc = [0.0] * length
                for i in range(nq - w, nq):
                    pos = length - nq + i
                    s = [float(q[bb, h, i] @ k[bb, hk, j]) * scale for j in range(pos + 1)]
                    z = sum(math.exp(x - max(s)) for x in s)
                    for j in range(pos + 1):
                        acc[j] += math.exp(s[j] - max(s)) / z
                vote = [max(x, y) for x, y in zip(vote, acc)]
            r = cfg.kernel // 2
            if cfg.pool == "avg":
                pooled = [sum(vote[j + o] for o in range(-r, r + 1) if 0 <= j + o < length) / cfg.kernel
                          for j in range(length)]
            else:
                pooled = [max(vote[j + o] for o in range(-r, r + 1) if 0 <= j + o < length) for j in range(length)]
            forced = [j for j in range(length) if j < cfg.sinks or j >= length - cfg.recent]
            free = sorted((j for j in range(length) if j not in forced), key=lambda j: -pooled[j])
            row.append(sorted(forced + free[: cfg.capacity]))
        kept.append(row)
    return torch.tensor(kept), pooled


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_snapkv_selection_and_decoding_on_the_compressed_cache(pool):
    b, hq, hkv, d, length, extra = 2, 4, 2, 8, 40, 5
    cfg = SnapKV(capacity=9, window=6, kernel=3, pool=pool, sinks=2, recent=4)
    q, k, v = (torch.randn(b, h, length + extra, d) for h in (hq, hkv, hkv))
    qp, kp = q[:, :, :length], k[:, :, :length]
    want_idx, _ = snapkv_loop(qp[:, :, -10:], kp, cfg, d**-0.5)
    idx = snapkv_select(qp[:, :, -10:], kp, cfg)
    assert idx.shape == (b, hkv, 2 + 4 + 9)
    assert torch.equal(idx, want_idx)
    # decoding on the compressed cache: kept prompt keys (per head) and the new tokens, causal
    cache = KVCache(b, hkv, d)
    cache.append(kp, v[:, :, :length])
    assert torch.equal(snapkv_compress(cache, qp[:, :, -10:], cfg), want_idx)
    assert cache.size == 15 and torch.equal(cache.positions, idx)
    with pytest.raises(ValueError, match="compressed"):
        snapkv_compress(cache, qp, cfg)
    outs = []
    for t in range(length, length + extra):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        outs.append(attend_decode(q[:, :, t : t + 1], cache))
    mask = torch.zeros(b, hq, extra, length + extra, dtype=torch.bool)
    for bb in range(b):
        for h in range(hq):
            mask[bb, h, :, idx[bb, h // 2]] = True
    mask[..., length:] = bf.causal(extra)
    want, _ = dense_attention(q[:, :, length:], k, v, mask)
    torch.testing.assert_close(torch.cat(outs, 2), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="compressed .SnapKV. cache decodes with Causal only"):
        attend_decode(q[:, :, -1:], cache, SlidingWindow(length + extra, 3))


def test_snapkv_keeps_everything_of_a_short_prompt_and_scores_in_chunks(monkeypatch):
    import foveal.decode

    monkeypatch.setattr(foveal.decode, "SNAPKV_CHUNK_ELEMENTS", 20)  # keys in chunks of 3
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 12, 4)
    assert torch.equal(snapkv_select(q, k, SnapKV(capacity=20)), torch.arange(12).expand(1, 2, 12))
    for kernel, pool in ((1, "avg"), (5, "avg"), (5, "max")):
        cfg = SnapKV(capacity=3, window=6, kernel=kernel, pool=pool, sinks=0, recent=0)
        _, pooled = snapkv_loop(q, k, cfg, 0.5)  # pooled scores of the last head
        got = snapkv_scores(q, k, cfg, scale=0.5)[0, 1]
        torch.testing.assert_close(got, torch.tensor(pooled, dtype=torch.float32), atol=1e-5, rtol=1e-5)


# -- errors ---------------------------------------------------------------------------
def test_errors_name_the_argument():
    n = 16
    cache = KVCache(2, 2, 8, pattern=SlidingWindow(n, 4))
    k = torch.randn(2, 2, 3, 8)
    with pytest.raises(ValueError, match=r"k must be \(batch, kv_heads, tokens, 8\).*got \(2, 3, 3, 8\)"):
        cache.append(torch.randn(2, 3, 3, 8), k)
    with pytest.raises(TypeError, match="k must have the cache's dtype torch.float32, got torch.bfloat16"):
        cache.append(k.bfloat16(), k.bfloat16())
    cache.append(k, k)
    cache.append(k, k)
    attend_decode(torch.randn(2, 4, 6, 8), cache)  # nothing evicted yet: all six positions may query
    cache.append(k, k)  # evicts positions 0 and 1
    with pytest.raises(ValueError, match=r"q has 4 queries; they must be 1 \.\. 3"):
        attend_decode(torch.randn(2, 4, 4, 8), cache)
    with pytest.raises(ValueError, match="differs from the pattern"):
        attend_decode(torch.randn(2, 4, 1, 8), cache, Causal(n))
    with pytest.raises(TypeError, match="select must be None or a Quest"):
        attend_decode(torch.randn(2, 4, 1, 8), KVCache(2, 2, 8), select="quest")
    with pytest.raises(ValueError, match="pattern covers 16 positions"):
        for _ in range(4):
            cache.append(k, k)
    with pytest.raises(ValueError, match="pool must be 'avg' or 'max', got 'mean'"):
        SnapKV(pool="mean")
    with pytest.raises(TypeError, match="page_size must be an int, got 2.5"):
        Quest(page_size=2.5)
    with pytest.raises(ValueError, match="needs an uncompressed causal cache"):
        attend_decode(torch.randn(2, 4, 1, 8), KVCache(2, 2, 8, pattern=SlidingWindow(n, 4)), select=Quest())


def test_decode_steps_take_the_fused_forms_where_the_mask_allows():
    from foveal.decode import step_inputs

    n = 64
    k = v = torch.randn(1, 2, 40, 8)
    kpos = torch.arange(40)
    p, _, _ = step_inputs(None, torch.tensor([39]), kpos, k, v)  # one query, causal cache: every key
    assert p == Causal(1, n_kv=40) and bool(p.dense_mask().all())
    p, _, _ = step_inputs(SlidingWindow(n, 50), torch.tensor([39]), kpos, k, v)
    assert p == Full(1, n_kv=40)
    p, _, _ = step_inputs(Causal(n), torch.arange(36, 40), kpos, k, v)  # a chunk: bottom-right causal
    assert p == Causal(4, n_kv=40)
    p, kk, _ = step_inputs(Strided(n, 3) & Causal(n), torch.tensor([39]), kpos, k, v)  # one query: its keys
    assert p == Full(1, n_kv=14) and torch.equal(kk, k[:, :, 0::3])
    p, _, _ = step_inputs(SlidingWindow(n, 5), torch.arange(30, 40), kpos, k, v)  # the general mask
    assert isinstance(p, MaskPattern)
