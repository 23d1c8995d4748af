"""``foveal bench run plan-build``: the cpu backend's gather plan, built and cached.

Per pattern: the median time of building its gather plan (``foveal.kernels.plan.build_plan``,
nothing cached), the patterns timed in interleaved rounds. Then, for a causal sliding
window of 512 (batch 1, 8 query heads over 2 key heads, head_dim 64, float32, forward):
a cold ``attend`` (plan cache cleared: the call builds its plan), a warm one (plan
cached) and the build alone, in interleaved rounds. One thread. It replaces
``benchmarks/plan_build.py``, whose comparison with the build before its vectorisation
(commit 184034a) is history.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from foveal.bench.measure import progress
from foveal.bench.report import result_name, write_report
from foveal.bench.timing import time_interleaved
from foveal.bench.train import threads

__all__ = ["SIZES", "cases", "patterns", "run_suite"]

#: registry sizes → (tokens of the patterns, tokens of the attend cases, timed rounds)
SIZES = {"dry": (1024, (1024,), 1), "quick": (16384, (16384,), 3), "full": (65536, (16384, 65536), 3)}


def patterns(n: int) -> list:
    """The patterns whose plans are built: windows, sinks, an intersection, a 2-D neighbourhood, power, dilated."""
    from foveal.patterns import Causal, Dilated, Neighborhood, Power, Sinks, SlidingWindow

    side = math.isqrt(n)
    dilated = Dilated(n // 4, (n // 32, n // 8), (1, 4))
    return [SlidingWindow(n, 512), SlidingWindow(n, 1024) | Sinks(n, 4), Causal(n) & SlidingWindow(n, 1024),
            Neighborhood((side, side), 7), Power(n, 64), dilated, dilated & Causal(n // 4)]


def _builds(n: int, rounds: int) -> list[dict]:
    from foveal.kernels.plan import build_plan

    cases = {repr(p): p for p in patterns(n)}
    fns = {name: (lambda p=p: build_plan(p)) for name, p in cases.items()}
    timed = time_interleaved(fns, torch.device("cpu"), min_runs=rounds, max_runs=rounds, min_seconds=0.0,
                             memory=False)
    return [{"kind": "build", "pattern": name, "tokens": cases[name].n, "first_s": t["first_s"],
             "median_s": t["median_s"], "runs": t["runs"]} for name, t in timed.items()]


def _attend(tokens: int, rounds: int) -> dict:
    from foveal import SlidingWindow, attend
    from foveal.kernels import cpu
    from foveal.kernels.plan import build_plan

    p = SlidingWindow(tokens, 512)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, tokens, 64, generator=gen)
    k, v = torch.randn(1, 2, tokens, 64, generator=gen), torch.randn(1, 2, tokens, 64, generator=gen)

    def cold():
        cpu.PLANS.clear()
        return attend(q, k, v, p, backend="cpu")

    fns = {"cold": cold, "warm": lambda: attend(q, k, v, p, backend="cpu"), "build": lambda: build_plan(p)}
    with torch.no_grad():
        timed = time_interleaved(fns, torch.device("cpu"), min_runs=rounds, max_runs=rounds, min_seconds=0.0,
                                 memory=False)
    out = {f"{name}_s": t["median_s"] for name, t in timed.items()}
    return {"kind": "attend", "pattern": repr(p), "tokens": tokens, **out, "runs": rounds}


def report(result: dict) -> str:
    """Markdown: build time per pattern; cold, warm and build time of the window's attend."""
    lines = [f"suite `plan-build` size `{result['size']}` on {result['device']}, one thread", "",
             "| pattern | tokens | plan build (median) | first build |", "|---|---|---|---|"]
    for r in (r for r in result["rows"] if r["kind"] == "build"):
        lines.append(f"| `{r['pattern']}` | {r['tokens']} | {r['median_s'] * 1e3:.1f} ms | "
                     f"{r['first_s'] * 1e3:.1f} ms |")
    lines += ["", "| attend, batch 1, 8/2 heads, head_dim 64 | tokens | cold (plan built) | warm (plan cached) | "
              "build alone | build ÷ cold |", "|---|---|---|---|---|---|"]
    for r in (r for r in result["rows"] if r["kind"] == "attend"):
        lines.append(f"| `{r['pattern']}` | {r['tokens']} | {r['cold_s'] * 1e3:.1f} ms | {r['warm_s'] * 1e3:.1f} ms | "
                     f"{r['build_s'] * 1e3:.1f} ms | {r['build_s'] / r['cold_s']:.3f} |")
    return "\n".join(lines) + "\n"


def cases(size: str) -> list[str]:
    """The cases of a size: every pattern's plan build, then the window's attend at each length."""
    n, attend_tokens, _ = SIZES[size]
    return [f"plan build {p!r}" for p in patterns(n)] + [f"attend SlidingWindow({t}, 512), cold and warm"
                                                          for t in attend_tokens]


def run_suite(size: str, out_dir: str = "bench-out", *, device=None, contenders=None, limit=None) -> dict:
    """Build every pattern's plan, then time the window's cold and warm attend; write ``plan-build-cpu.*``."""
    if device not in (None, "cpu") or contenders is not None:
        raise ValueError("the plan-build suite times the cpu backend's plans: --device and --contenders do not apply")
    n, attend_tokens, rounds = SIZES[size]
    start = time.perf_counter()
    with threads(1):
        progress(0, 1 + len(attend_tokens), f"plan builds at {n} tokens", start)
        rows = _builds(n, rounds)
        for i, tokens in enumerate(attend_tokens):
            progress(1 + i, 1 + len(attend_tokens), f"attend at {tokens} tokens", start)
            rows.append(_attend(tokens, rounds))
    progress(1 + len(attend_tokens), 1 + len(attend_tokens), f"done in {time.perf_counter() - start:.0f}s", start)
    sys.stderr.write("\n")
    result = {"suite": "plan-build", "size": size, "device": "cpu", "rows": rows}
    return write_report(out_dir, result_name("plan-build", "cpu"), result, report(result))
