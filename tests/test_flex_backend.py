"""The ``flex`` backend (compiled FlexAttention fed by the analytic layout) against the reference.

On CPU compiled FlexAttention is forward-only: the backend says so, and ``auto``
never picks it for calls that need gradients or the log-sum-exp. Compiles take
seconds per shape, so the CPU checks are few; on a GPU the checks are broad.
"""

import random

import pytest
import torch
from strategies import random_pattern

from foveal import Causal, GlobalTokens, Neighborhood, SlidingWindow, Sinks, attend
from foveal.kernels.select import BACKENDS, Call, select

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(n, hq=4, hkv=2, d=16, dtype=torch.float32, device="cpu", grad=False):
    q = torch.randn(2, hq, n, d, dtype=dtype, device=device, requires_grad=grad)
    k = torch.randn(2, hkv, n, d, dtype=dtype, device=device, requires_grad=grad)
    v = torch.randn(2, hkv, n, d, dtype=dtype, device=device, requires_grad=grad)
    return q, k, v


def test_flex_states_its_cpu_limits():
    p = Causal(64)
    q, k, v = _qkv(64, grad=True)
    reasons = BACKENDS["flex"].why_not(Call(q, k, v, p, 0.25, need_lse=True))
    assert any("inference only" in r for r in reasons) and any("log-sum-exp" in r for r in reasons)
    q64, k64, v64 = _qkv(64, dtype=torch.float64)
    assert any("float64" in r for r in BACKENDS["flex"].why_not(Call(q64, k64, v64, p, 0.25, need_lse=False)))
    with pytest.raises(ValueError, match="backend 'flex' cannot run this call: compiled FlexAttention on CPU"):
        attend(q, k, v, p, backend="flex")


def test_auto_never_picks_flex_on_cpu_for_gradients():
    q, k, v = _qkv(64, grad=True)
    assert select(Call(q, k, v, Causal(64), 0.25, need_lse=False), "auto").name == "sdpa"  # no mask: fused SDPA
    assert select(Call(q, k, v, SlidingWindow(64, 8), 0.25, need_lse=False), "auto").name == "sdpa"  # small
    qb, kb, vb = (t.detach().repeat(1, 1, 16, 1).requires_grad_() for t in (q, k, v))
    assert select(Call(qb, kb, vb, SlidingWindow(1024, 8), 0.25, need_lse=False), "auto").name == "cpu"


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_flex_forward_on_cpu_matches_reference(dtype, atol):
    p = Neighborhood((12, 12), 5, dilation=(1, 2)) | GlobalTokens((12, 12), 3)
    q, k, v = _qkv(p.n, dtype=dtype)
    with torch.no_grad():
        out = attend(q, k, v, p, backend="flex")
    torch.testing.assert_close(out.float(), attend(q, k, v, p, backend="reference").float(), atol=atol, rtol=atol)


@cuda
@pytest.mark.parametrize("backend", ["flex", "cpu"])
@pytest.mark.parametrize("seed", range(12))
def test_gpu_backends_match_reference_forward_and_backward(backend, seed):
    rng = random.Random(seed)
    p, _ = random_pattern(rng)
    q, k, v = _qkv(p.n, d=16, device="cuda", grad=True)
    out, lse = attend(q, k, v, p, backend=backend, return_lse=True)
    ref, ref_lse = attend(q, k, v, p, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    live = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[live], ref_lse[live], atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), g)
    theirs = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@cuda
def test_gpu_auto_uses_flex_for_long_windows():
    from foveal.kernels.reference import reference_attention

    p = SlidingWindow(8192, 512) | Sinks(8192, 4)
    q, k, v = _qkv(p.n, d=64, device="cuda", dtype=torch.bfloat16)
    assert select(Call(q, k, v, p, 0.125), "auto").name == "flex"
    out = attend(q, k, v, p)
    rows = torch.arange(0, 8192, 97, device="cuda")
    mask = p.mask(rows[:, None], torch.arange(8192, device="cuda")[None])
    want, _ = reference_attention(q[:, :, rows], k, v, mask, 0.125)
    torch.testing.assert_close(out[:, :, rows].float(), want.float(), atol=2e-2, rtol=2e-2)
