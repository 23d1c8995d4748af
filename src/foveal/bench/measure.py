"""Rates and report lines shared by the speed benchmarks (timing: ``timing``; memory: ``memory``)."""

from __future__ import annotations

import sys
import time

import torch

from foveal.bench.timing import time_call

__all__ = ["matmul_rate", "progress", "target_line"]


def matmul_rate(device, dtype) -> float:
    """Dense matmul FLOP/s of this machine for ``dtype``, measured now (median of warm runs)."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _, t, _ = time_call(lambda: a @ b, device, min_runs=5, min_seconds=0.5)
    return 2 * n**3 / t


def progress(i: int, total: int, text: str, start: float | None = None):
    """A one-line progress bar on stderr, with elapsed time when ``start`` is given."""
    width = 30
    done = int(width * i / max(total, 1))
    elapsed = f" {time.perf_counter() - start:4.0f}s" if start is not None else ""
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{total}{elapsed} {text[:60]:<60}")
    sys.stderr.flush()


def target_line(x: float, text: str, goal: float, digits: int = 2) -> str:
    """A report line for a ratio against its target: ``- text: 0.93× (target ≤ 1.05×) — met``."""
    return f"- {text}: {x:.{digits}f}× (target ≤ {goal}×) — {'met' if x <= goal else 'NOT met'}"
