"""``foveal check``: every built-in pattern, on every backend, against independent dense attention.

For each gallery pattern, random q/k/v (batch 2, 4 query heads over 2 key heads) go
through ``attend`` on each registered backend, forward and backward, and the result is
compared with PyTorch's dense ``scaled_dot_product_attention`` under the pattern's
boolean mask (an implementation foveal does not share).
"""

from __future__ import annotations

import time

import torch

from foveal.functional import attend
from foveal.gallery import GALLERY
from foveal.kernels.call import Call
from foveal.kernels.select import BACKENDS, why_not

__all__ = ["check_all"]


def _sdpa(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def check_pattern(pattern, backend: str, *, dtype=torch.float32, seed: int = 0):
    """Max abs error of ``attend`` on ``backend`` vs dense SDPA: (forward, gradients), or the reasons it cannot run."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, pattern.n, 32, generator=gen, dtype=dtype)
    k, v = (torch.randn(2, 2, pattern.n, 32, generator=gen, dtype=dtype) for _ in range(2))
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        reasons = why_not(Call(*ours, pattern, 32**-0.5), backend)
        if reasons:
            return reasons
        out = attend(*ours, pattern, backend=backend)
        want = _sdpa(*theirs, pattern.dense_mask())
        grad = torch.randn(out.shape, generator=gen, dtype=dtype)
        out.backward(grad)
        want.backward(grad)
    fwd = (out - want).abs().max().item()
    bwd = max((a.grad - b.grad).abs().max().item() for a, b in zip(ours, theirs))
    return fwd, bwd


def check_all(tolerance: float = 1e-5, print_fn=print) -> bool:
    """Check every gallery pattern on every backend; print a table; True if all agree within ``tolerance``."""
    ok = True
    header = f"{'pattern':<34} {'tokens':>6} {'density':>8} {'backend':<10} {'fwd err':>9} {'grad err':>9}  result"
    print_fn(header)
    print_fn("-" * len(header))
    start = time.perf_counter()
    for name, pattern in GALLERY.items():
        for backend in BACKENDS:
            res = check_pattern(pattern, backend)
            if isinstance(res, list):
                line = f"{'n/a':>9} {'n/a':>9}  not run: {res[0]}"
            else:
                good = max(res) <= tolerance
                ok &= good
                line = f"{res[0]:>9.1e} {res[1]:>9.1e}  {'ok' if good else 'MISMATCH'}"
            print_fn(f"{name:<34} {pattern.n:>6} {pattern.density():>8.2%} {backend:<10} {line}")
    verdict = "all backends agree with dense attention" if ok else "MISMATCHES found"
    print_fn(f"\n{verdict} (tolerance {tolerance:g}, float32, forward and backward) in {time.perf_counter() - start:.1f}s")
    return ok
