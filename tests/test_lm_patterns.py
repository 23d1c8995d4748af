"""Long-context LM patterns (LongNet, PowerAttention, BigBird, packed-sequence masks) against brute force."""

import random

import pytest
import torch

import bruteforce as bf
from foveal import (
    BigBird,
    BlockLayout,
    Causal,
    CausalBlockwise,
    Dilated,
    Document,
    Full,
    Power,
    PrefixLM,
    SharedQuestion,
    SlidingWindow,
    attend,
)
from foveal.layout import EMPTY, FULL


def _random_lengths(rng, docs=None):
    return [rng.randint(1, 25) for _ in range(docs or rng.randint(1, 5))]


def random_lm_pattern(rng):
    """A random LM pattern, its brute-force mask, and whether its layout is exact (single progression)."""
    kind = rng.choice(["dilated1", "dilated", "power", "document", "document_window", "document_full",
                       "prefix", "shared", "blockwise"])
    if kind.startswith("dilated"):
        n = rng.randint(1, 80)
        pairs = []
        for _ in range(1 if kind == "dilated1" else rng.randint(2, 3)):
            w = rng.randint(1, 40)
            pairs.append((w, rng.randint(1, w)))
        p = Dilated(n, tuple(w for w, _ in pairs), tuple(r for _, r in pairs))
        return p, bf.dilated(n, pairs), kind == "dilated1"
    if kind == "power":
        n, block = rng.randint(1, 90), rng.randint(1, 9)
        window, sinks = rng.randint(0, 3), rng.randint(0, 2)
        return Power(n, block, window, sinks), bf.power(n, block, window, sinks), False
    lengths = _random_lengths(rng)
    if kind == "document":
        return Document(lengths, Causal), bf.document(lengths, lambda i, j, L: j <= i), True
    if kind == "document_full":
        return Document(lengths, Full), bf.document(lengths, lambda i, j, L: True), True
    if kind == "document_window":
        w = rng.randint(0, 6)
        return (Document(lengths, lambda n: SlidingWindow(n, w)),
                bf.document(lengths, lambda i, j, L: i - w <= j <= i), True)
    if kind == "prefix":
        n = sum(lengths)
        prefix = rng.randint(0, n)
        return PrefixLM(n, prefix), bf.prefix_lm(n, prefix), True
    if kind == "shared":
        return SharedQuestion(lengths), bf.shared_question(lengths), False
    return CausalBlockwise(lengths), bf.causal_blockwise(lengths), True


@pytest.mark.parametrize("seed", range(120))
def test_lm_pattern_mask_density_and_layout(seed):
    rng = random.Random(seed)
    p, expected, exact = random_lm_pattern(rng)
    assert torch.equal(p.dense_mask(), expected), p
    assert p.density() == pytest.approx(expected.float().mean().item()), p
    bq, bk = rng.randint(1, p.n + 2), rng.randint(1, p.n + 2)
    got = p.layout(bq, bk).block_states()
    want = BlockLayout.from_dense_mask(expected, bq, bk).block_states()
    if exact:
        assert torch.equal(got, want), (p, bq, bk)
    else:  # unions: every non-empty block listed, every listed full block full
        assert torch.all((want == EMPTY) | (got != EMPTY)) and torch.all((got != FULL) | (want == FULL)), p


@pytest.mark.parametrize("seed", range(20))
def test_lm_patterns_on_the_cpu_kernel(seed):
    rng = random.Random(100 + seed)
    p, expected, _ = random_lm_pattern(rng)
    q = torch.randn(2, 4, p.n, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, p.n, 8, requires_grad=True) for _ in range(2))
    out = attend(q, k, v, p, backend="cpu")
    ref = attend(q, k, v, p, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("seed", range(8))
def test_bigbird_structure(seed):
    rng = random.Random(seed)
    block, window, globals_, random_ = rng.randint(1, 6), rng.choice([1, 3, 5]), rng.randint(0, 2), rng.randint(0, 3)
    n = rng.randint(block, 120)
    p = BigBird(n, block, window, globals_, random_, seed=seed)
    nb = -(-n // block)
    states = BlockLayout.from_dense_mask(p.dense_mask(), block, block).block_states() > 0
    half = window // 2
    for qb in range(nb):
        band = set(range(max(0, qb - half), min(nb, qb + half + 1)))
        glob = set(range(min(globals_, nb)))
        row = set(torch.nonzero(states[qb]).flatten().tolist())
        if qb in glob:
            assert row == set(range(nb))
            continue
        assert band | glob <= row
        extra = row - band - glob
        assert len(extra) == min(random_, nb - len(band | glob))
    # seeded: the same seed gives the same pattern, another seed may not
    assert torch.equal(p.dense_mask(), BigBird(n, block, window, globals_, random_, seed=seed).dense_mask())


def test_power_reaches_every_earlier_block_in_log_steps():
    p = Power(1024, block=8, window=1, sinks=0)
    blocks = BlockLayout.from_dense_mask(p.dense_mask(), 8, 8).block_states() > 0
    reach = blocks.clone()
    for _ in range(7):  # 2^7 = 128 blocks
        reach = reach | ((reach.float() @ blocks.float()) > 0)
    assert torch.equal(reach, torch.ones(128, 128, dtype=torch.bool).tril())
    assert blocks.sum(1).max() <= 1 + 1 + 7  # diagonal, window, powers of two


def test_prefix_lm_spans_causal_to_full():
    # attention-gym's prefix-LM mask: j <= i or j < prefix, for every prefix in 0..n
    n = 13
    assert torch.equal(PrefixLM(n, 0).dense_mask(), Causal(n).dense_mask())
    assert torch.equal(PrefixLM(n, n).dense_mask(), Full(n).dense_mask())
    for prefix in (0, 1, 5, n):
        assert torch.equal(PrefixLM(n, prefix).dense_mask(), bf.prefix_lm(n, prefix))
    with pytest.raises(ValueError, match="prefix must be >= 0, got -1"):
        PrefixLM(n, -1)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: Dilated(64, (8, 16), (1,)), ValueError, "segment and rate must have the same length"),
        (lambda: Dilated(64, 8, 16), ValueError, "rate must be <= segment in each pair; pair 0 has rate 16 > segment 8"),
        (lambda: Power(64, 0), ValueError, "block must be >= 1, got 0"),
        (lambda: BigBird(64, 4, window=2), ValueError, "window must be odd"),
        (lambda: Document([], Causal), TypeError, "lengths must be a non-empty sequence"),
        (lambda: Document([3, 0], Causal), ValueError, r"lengths\[1\] must be >= 1, got 0"),
        (lambda: Document([3, 4], lambda n: 3), TypeError, "inner must build a 1-D pattern"),
        (lambda: PrefixLM(10, 11), ValueError, "prefix must be <= the number of tokens 10, got 11"),
        (lambda: SharedQuestion("abc"), TypeError, "lengths must be a non-empty sequence"),
    ],
)
def test_lm_pattern_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()
