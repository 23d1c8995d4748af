"""Score terms (``attend(..., bias=)``): every backend against a brute-force loop, with gradients."""

import math
import random

import pytest
import torch
from strategies import random_pattern

from foveal import Causal, GlobalTokens, Neighborhood, SlidingWindow, Window, attend
from foveal.bias import ALiBi, RelativePositionBias


def naive_biased(q, k, v, mask, scale, term):
    """Per-query loops in float64, adding ``term(h, i, j)`` (a Python function) to each score."""
    b, hq, n, _ = q.shape
    groups = hq // k.shape[1]
    out = torch.zeros(b, hq, n, v.shape[-1], dtype=torch.float64)
    for h in range(hq):
        for i in range(n):
            keys = torch.nonzero(mask[i]).flatten().tolist()
            if not keys:
                continue
            s = torch.stack([(q[:, h, i].double() * k[:, h // groups, j].double()).sum(-1) * scale + term(h, i, j)
                             for j in keys], -1)
            w = torch.softmax(s, -1)
            out[:, h, i] = (w[:, :, None] * v[:, h // groups, keys].double()).sum(1)
    return out


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(ALiBi(8).slopes, torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads
    s16 = [2 ** (-0.5 * (i + 1)) for i in range(16)]
    assert torch.allclose(ALiBi(12).slopes, torch.tensor([2.0 ** -(i + 1) for i in range(8)] + s16[0::2][:4]))


def test_relative_position_bias_values():
    table = torch.randn(3, 5, 7)
    rpb = RelativePositionBias((6, 8), (2, 3), table)
    for h, i, j in [(0, 0, 0), (1, 9, 18), (2, 47, 40), (0, 10, 47)]:
        qi, qj, ki, kj = i // 8, i % 8, j // 8, j % 8
        want = table[h, max(-2, min(2, ki - qi)) + 2, max(-3, min(3, kj - qj)) + 3]
        assert rpb(torch.tensor(h), torch.tensor(i), torch.tensor(j)) == want


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", ["alibi", "rpb", "function"])
def test_biased_attention_matches_brute_force(backend, kind):
    p = Neighborhood((5, 6), 3) | GlobalTokens((5, 6), 1)
    hq = 4
    if kind == "alibi":
        bias = ALiBi(hq)
        term = lambda h, i, j: -bias.slopes[h].item() * abs(i - j)  # noqa: E731
    elif kind == "rpb":
        table = torch.randn(hq, 9, 11)
        bias = RelativePositionBias((5, 6), (4, 5), table)
        term = lambda h, i, j: table[h, j // 6 - i // 6 + 4, j % 6 - i % 6 + 5].item()  # noqa: E731
    else:
        bias = lambda h, qi, ki: 0.3 * torch.cos(0.5 * qi - 0.2 * ki + h)  # noqa: E731
        term = lambda h, i, j: 0.3 * math.cos(0.5 * i - 0.2 * j + h)  # noqa: E731
    q, k, v = torch.randn(2, hq, p.n, 8), torch.randn(2, 2, p.n, 8), torch.randn(2, 2, p.n, 8)
    got = attend(q, k, v, p, bias=bias, backend=backend)
    torch.testing.assert_close(got.double(), naive_biased(q, k, v, p.dense_mask(), 8**-0.5, term), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(20))
def test_cpu_bias_gradients_match_reference(seed):
    rng = random.Random(seed)
    p, _ = random_pattern(rng)
    hkv = rng.choice([1, 2])
    hq = hkv * rng.choice([1, 2])
    extent = tuple(s - 1 for s in p.shape)
    table = torch.randn(hq, *(2 * e + 1 for e in extent), requires_grad=True)
    bias = RelativePositionBias(p.shape, extent, table)
    q = torch.randn(2, hq, p.n, 8, requires_grad=True)
    k, v = (torch.randn(2, hkv, p.n, 8, requires_grad=True) for _ in range(2))
    out, lse = attend(q, k, v, p, bias=bias, backend="cpu", return_lse=True)
    ref, ref_lse = attend(q, k, v, p, bias=bias, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    live = torch.isfinite(ref_lse)
    ours = torch.autograd.grad((out * g).sum() + lse[live].sum(), (q, k, v, table))
    theirs = torch.autograd.grad((ref * g).sum() + ref_lse[live].sum(), (q, k, v, table))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_with_learned_table(backend):
    p = Window((4, 4), 2) | Causal((4, 4))
    table = torch.randn(2, 7, 7, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 2, 16, 3, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 16, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def f(q, k, v, table):
        return attend(q, k, v, p, bias=RelativePositionBias((4, 4), 3, table), backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, table))


def test_only_the_bias_requires_grad():
    p = SlidingWindow(40, 5)
    table = torch.zeros(2, 81, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    out = attend(q, k, v, p, bias=RelativePositionBias(40, 40, table), backend="cpu")
    out.sum().backward()
    ref_table = table.detach().clone().requires_grad_()
    attend(q, k, v, p, bias=RelativePositionBias(40, 40, ref_table), backend="reference").sum().backward()
    torch.testing.assert_close(table.grad, ref_table.grad, atol=1e-5, rtol=1e-5)


def test_flex_forward_with_bias_on_cpu():
    p = SlidingWindow(256, 32) | GlobalTokens(256, 2)
    q, k, v = (torch.randn(1, 4, 256, 16) for _ in range(3))
    bias = ALiBi(4)
    with torch.no_grad():
        out = attend(q, k, v, p, bias=bias, backend="flex")
    torch.testing.assert_close(out, attend(q, k, v, p, bias=bias, backend="reference"), atol=1e-5, rtol=1e-5)


def test_bias_errors():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(TypeError, match="bias must be None or a callable"):
        attend(q, q, q, Causal(8), bias=torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"table must have shape \(heads, 5, 7\), got \(2, 5, 5\)"):
        RelativePositionBias((6, 8), (2, 3), torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="max_offset must be >= 0"):
        RelativePositionBias((6, 8), -1)


def test_table_index_is_the_brute_force_offset_with_steps_and_3d():
    grid, extent, step = (3, 4, 5), (2, 1, 3), (1, 2, 1)
    table = torch.randn(2, 5, 3, 7)
    rpb = RelativePositionBias(grid, extent, table, step=step)
    coords = [(a, b, c) for a in range(3) for b in range(4) for c in range(5)]
    qi, ki = torch.arange(60)[:, None], torch.arange(60)[None, :]
    got = rpb.gather(torch.broadcast_to(rpb.table_index(qi, ki), (60, 60)))
    for i, ci in enumerate(coords):
        for j, cj in enumerate(coords):
            idx = [max(-m, min(m, (b - a) // s)) + m for a, b, m, s in zip(ci, cj, extent, step)]
            assert torch.equal(got[:, i, j], table[(slice(None), *idx)])


@pytest.mark.parametrize("backend", ["cpu", "sdpa"])
def test_cached_term_index_is_per_geometry(backend):
    """Two tables of different reach on one pattern, one after the other: each gets its own index."""
    p = Window((6, 6), 3, shift=1)
    q, k, v = (torch.randn(1, 2, 36, 8) for _ in range(3))
    for extent in ((2, 2), (1, 2), (5, 5)):
        table = torch.randn(2, *(2 * e + 1 for e in extent))
        bias = RelativePositionBias((6, 6), extent, table)

        def term(h, i, j, e=extent, t=table):
            return t[h, max(-e[0], min(e[0], j // 6 - i // 6)) + e[0], max(-e[1], min(e[1], j % 6 - i % 6)) + e[1]].item()

        got = attend(q, k, v, p, bias=bias, backend=backend)
        torch.testing.assert_close(got.double(), naive_biased(q, k, v, p.dense_mask(), 8**-0.5, term),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [0, 2])
def test_window_groups_share_one_table_index_and_match_the_reference(shift):
    """Windows read the table at the same offsets: the cpu kernel keeps one group's index per chunk (broadcast),
    and output, lse and every gradient (the table's summed over the groups) equal the reference."""
    from foveal.kernels.cpu import plan_for

    p = Window((8, 12), 4, shift=shift)
    table = torch.randn(2, 7, 7, requires_grad=True)
    bias = RelativePositionBias((8, 12), 3, table)
    q = torch.randn(2, 2, p.n, 8, requires_grad=True)
    k, v = (torch.randn(2, 1, p.n, 8, requires_grad=True) for _ in range(2))
    out, lse = attend(q, k, v, p, bias=bias, backend="cpu", return_lse=True)
    ref, ref_lse = attend(q, k, v, p, bias=bias, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    ours = torch.autograd.grad((out * g).sum() + lse.sum(), (q, k, v, table))
    theirs = torch.autograd.grad((ref * g).sum() + ref_lse.sum(), (q, k, v, table))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)
    indices = [val for chunk in plan_for(p).chunks for key, val in chunk._cache.items() if key[0] == "table index"]
    assert indices and any(i.shape[0] == 1 for i in indices)
