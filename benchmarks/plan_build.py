"""Gather-plan build time, old (one Python step per group) against vectorised, and cold/warm ``attend``.

Run alone (the machine is shared): ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/plan_build.py``.
The old ``build_plan`` is read from git (``OLD``, the commit before the vectorised build). Prints, per
pattern, the median of ``REPEAT`` builds of each and their ratio; then, for a causal sliding window
of 512 at 16k and 64k tokens (batch 1, 8 query heads, 2 key heads, head_dim 64, float32, forward),
the cold call (plan not cached) against the warm one, and the warm kernel time with old and new plans.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import types

import torch

from foveal import Causal, Dilated, Neighborhood, Power, Sinks, SlidingWindow, attend
from foveal.kernels import cpu
from foveal.kernels.plan import build_plan

OLD = "184034a"
REPEAT = 3


def old_build_plan():
    src = subprocess.run(["git", "show", f"{OLD}:src/foveal/kernels/plan.py"], capture_output=True, text=True,
                         check=True).stdout
    mod = types.ModuleType("plan_old")
    sys.modules["plan_old"] = mod  # dataclasses look their module up
    exec(compile(src, "plan_old.py", "exec"), mod.__dict__)
    return mod.build_plan


def timed(fn, repeat=REPEAT):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main():
    torch.set_num_threads(1)
    old = old_build_plan()
    n = 1 << 16
    cases = [
        SlidingWindow(16384, 512), SlidingWindow(n, 512), SlidingWindow(n, 1024) | Sinks(n, 4),
        Causal(n) & SlidingWindow(n, 1024), Neighborhood((256, 256), 7), Power(n, 64),
        Dilated(n // 4, (2048, 8192), (1, 4)), Dilated(n // 4, (2048, 8192), (1, 4)) & Causal(n // 4),
    ]
    print(f"{'pattern':58s} {'old s':>8s} {'new s':>8s} {'old/new':>8s}")
    for p in cases:
        t_old, _ = timed(lambda: old(p))
        t_new, _ = timed(lambda: build_plan(p))
        print(f"{repr(p)[:58]:58s} {t_old:8.4f} {t_new:8.4f} {t_old / t_new:8.1f}", flush=True)
    print()
    print(f"{'attend, SlidingWindow(n, 512)':30s} {'build s':>8s} {'cold s':>8s} {'warm s':>8s} {'build/cold':>10s}"
          f" {'warm old plan s':>16s}")
    for tokens in (16384, n):
        p = SlidingWindow(tokens, 512)
        q = torch.randn(1, 8, tokens, 64)
        k, v = torch.randn(1, 2, tokens, 64), torch.randn(1, 2, tokens, 64)
        attend(q[:, :, :64], k[:, :, :64], v[:, :, :64], SlidingWindow(64, 8), backend="cpu")  # warm up torch
        colds, warms, builds, olds = [], [], [], []
        for _ in range(REPEAT):
            cpu.PLANS.clear()
            t = time.perf_counter()
            attend(q, k, v, p, backend="cpu")
            colds.append(time.perf_counter() - t)
            warms.append(timed(lambda: attend(q, k, v, p, backend="cpu"), 1)[0])
            builds.append(timed(lambda: build_plan(p), 1)[0])
            plan = old(p)
            olds.append(timed(lambda: cpu._run(q, k, v, plan, 64**-0.5, False), 1)[0])
        b, c, w, o = (statistics.median(x) for x in (builds, colds, warms, olds))
        print(f"{tokens:<30d} {b:8.3f} {c:8.3f} {w:8.3f} {b / c:10.3f} {o:16.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
