"""The ``cpu`` backend against the reference, forward and backward, on random patterns and shapes."""

import random

import pytest
import torch
from strategies import random_pattern

from foveal import Causal, GlobalTokens, MaskPattern, Neighborhood, SlidingWindow, Window, attend
from foveal.kernels.cpu import plan_for
from foveal.kernels.plan import build_plan


def _compare(p, b, hq, hkv, d, dv, dtype, tile=None, atol=1e-5):
    q = torch.randn(b, hq, p.n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, p.n, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, p.n, dv, dtype=dtype, requires_grad=True)
    out, lse = attend(q, k, v, p, backend="cpu", return_lse=True)
    ref, ref_lse = attend(q, k, v, p, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol, msg=lambda m: f"{p!r} out: {m}")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=atol, rtol=atol)
    g, gl = torch.randn_like(out), torch.randn_like(lse).masked_fill(~finite, 0)
    ours = torch.autograd.grad((out * g).sum() + (lse.masked_fill(~finite, 0) * gl).sum(), (q, k, v))
    theirs = torch.autograd.grad((ref * g).sum() + (ref_lse.masked_fill(~finite, 0) * gl).sum(), (q, k, v))
    for name, a, r in zip("qkv", ours, theirs):
        torch.testing.assert_close(a, r, atol=atol * 4, rtol=atol * 4, msg=lambda m: f"{p!r} d{name}: {m}")


@pytest.mark.parametrize("seed", range(60))
def test_cpu_matches_reference_on_random_patterns(seed):
    rng = random.Random(seed)
    p, _ = random_pattern(rng)
    hkv = rng.choice([1, 2])
    _compare(p, rng.randint(1, 2), hkv * rng.choice([1, 2, 4]), hkv, rng.choice([8, 16]), rng.choice([8, 12]), torch.float32)


@pytest.mark.parametrize("seed", range(15))
def test_cpu_matches_reference_on_random_unions(seed):
    rng = random.Random(500 + seed)
    a, _ = random_pattern(rng)
    b = GlobalTokens(a.shape, rng.randint(1, a.n)) if rng.random() < 0.5 else Causal(a.shape)
    p = (a | b) if rng.random() < 0.6 else (a & b)
    _compare(p, 2, 4, 2, 8, 8, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_cpu_dtypes(dtype):
    p = Neighborhood((9, 11), 3, dilation=(1, 2)) | GlobalTokens((9, 11), 2)
    atol = {torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    _compare(p, 2, 4, 2, 16, 16, dtype, atol=atol)


@pytest.mark.parametrize("tile", [(1, 1), (3, 5), (16, 16), (2, 7)])
def test_cpu_any_tile_is_exact(tile):
    p = Neighborhood((13, 14), (5, 4), stride=(2, 1), causal=(False, True))
    plan_for(p, tile)
    q, k, v = (torch.randn(2, 2, p.n, 8) for _ in range(3))
    from foveal.kernels.cpu import gather_attention

    out, _ = gather_attention(q, k, v, p, 8**-0.5, tile=tile)
    torch.testing.assert_close(out, attend(q, k, v, p, backend="reference"), atol=1e-5, rtol=1e-5)


def test_cpu_fully_masked_rows():
    p = MaskPattern(40, lambda qi, ki: (qi % 4 != 0) & (ki < qi), name="some_rows_empty")
    q, k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    out, lse = attend(q, k, v, p, backend="cpu", return_lse=True)
    assert torch.all(out[:, :, ::4] == 0) and torch.all(torch.isneginf(lse[:, :, ::4]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_plan_key_sets_are_exact_for_neighborhoods_and_windows():
    # an interior 8x8 tile of a 7x7 neighbourhood gathers exactly its 14x14 halo
    plan = build_plan(Neighborhood((64, 64), 7))
    assert max(c.keys.shape[1] for c in plan.chunks) == 196
    # window tiles that equal the windows need no mask at all
    plan = build_plan(Window((16, 16), 8), tile=(8, 8))
    assert all(c.allowed is None for c in plan.chunks)
    assert plan.gathered_pairs() == 256 * 64


@pytest.mark.parametrize("seed", range(40))
def test_key_set_is_a_sorted_superset_of_allowed_keys(seed):
    rng = random.Random(seed)
    p, mask = random_pattern(rng)
    q = torch.tensor(sorted(rng.sample(range(p.n), rng.randint(1, p.n))))
    keys = p.key_set(q)
    needed = torch.nonzero(mask[q].any(0)).flatten()
    assert torch.equal(keys, torch.unique(keys))
    assert torch.isin(needed, keys).all()


def test_cpu_memory_is_not_quadratic():
    # 64k tokens: a dense mask alone would be 4 GiB; the plan's masks are O(N * keys per group)
    p = SlidingWindow(1 << 16, 256)
    plan = plan_for(p)
    assert plan.mask_bytes() < 200 * 2**20
    assert plan.gathered_pairs() < (1 << 16) * 512


@pytest.mark.parametrize("seed", range(12))
def test_cpu_reads_strided_views_of_a_fused_qkv(seed):
    """q, k, v sliced out of one fused projection (non-contiguous views, any head count) give the reference's result."""
    rng = random.Random(1000 + seed)
    p = rng.choice([lambda: SlidingWindow(rng.randint(20, 90), rng.randint(1, 9)),
                    lambda: Neighborhood((rng.randint(4, 9), rng.randint(4, 9)), 3),
                    lambda: random_pattern(rng)[0]])()
    b, h, d = rng.randint(1, 2), rng.choice([1, 1, 2, 3]), rng.choice([4, 8])
    fused = torch.randn(b, p.n, 3, h, d, requires_grad=True)
    q, k, v = fused.permute(2, 0, 3, 1, 4).unbind(0)
    assert not k.is_contiguous()
    out = attend(q, k, v, p, backend="cpu")
    ref = attend(q.detach().contiguous(), k.detach().contiguous(), v.detach().contiguous(), p, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{p!r} heads={h}: {m}")
    (grad,) = torch.autograd.grad(out.square().sum(), fused)
    qr, kr, vr = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    gr = torch.autograd.grad(attend(qr, kr, vr, p, backend="reference").square().sum(), (qr, kr, vr))
    torch.testing.assert_close(grad.permute(2, 0, 3, 1, 4), torch.stack(gr), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_cpu_reads_keys_sliced_from_a_longer_buffer(seed):
    """k, v as the first tokens of longer buffers (a KV cache's view): the reference's result, forward and backward."""
    rng = random.Random(2000 + seed)
    nq, nk = rng.randint(1, 8), rng.randint(8, 40)
    p = rng.choice([Causal(nq, n_kv=nk), SlidingWindow(nq, rng.randint(1, 6), n_kv=nk)])
    b, hkv = rng.randint(1, 2), rng.choice([1, 2])
    kbuf = torch.randn(b, hkv, nk + 9, 8, requires_grad=True)
    vbuf = torch.randn(b, hkv, nk + 9, 8, requires_grad=True)
    q = torch.randn(b, hkv * 2, nq, 8)
    k, v = kbuf[:, :, :nk], vbuf[:, :, :nk]
    out = attend(q, k, v, p, backend="cpu")
    ref = attend(q, k.detach().contiguous(), v.detach().contiguous(), p, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{p!r}: {m}")
    gk, gv = torch.autograd.grad(out.square().sum(), (kbuf, vbuf))
    kr, vr = (t.detach().contiguous().requires_grad_() for t in (k, v))
    rk, rv = torch.autograd.grad(attend(q, kr, vr, p, backend="reference").square().sum(), (kr, vr))
    torch.testing.assert_close(gk[:, :, :nk], rk, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gv[:, :, :nk], rv, atol=1e-4, rtol=1e-4)
    assert not gk[:, :, nk:].any() and not gv[:, :, nk:].any()
