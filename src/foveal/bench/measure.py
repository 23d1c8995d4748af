"""Timing, memory and rate measurements shared by the benchmarks.

Machines are shared and noisy: every figure is taken in the same process as the
others it is compared with, warm, as a median of several runs.
"""

from __future__ import annotations

import json
import os
import sys
import statistics
import threading
import time
from pathlib import Path

import torch

__all__ = ["time_call", "PeakMemory", "matmul_rate", "progress", "target_line", "steady_heap", "write_report"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, *, min_runs: int = 3, max_runs: int = 10, min_seconds: float = 0.5):
    """(first-call seconds, median warm seconds, runs) of ``fn()``.

    The first call includes compile and layout work, if any; warm runs repeat until
    ``min_runs`` and ``min_seconds`` are both reached (at most ``max_runs``; one
    more run only when the first took over 5 s).
    """
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    if first > 5:
        min_runs, max_runs = 1, 1
    times = []
    while len(times) < max_runs and (len(times) < min_runs or sum(times) < min_seconds):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), len(times)


def _trim():
    """Return freed heap memory to the OS (glibc), so resident memory tracks live allocations."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def steady_heap() -> None:
    """Keep freed heap memory in the process (glibc: no trimming, no ``mmap`` below 32 MB) from now on.

    On a virtual machine that takes freed pages back, every fresh allocation faults its pages in again,
    and a model's forward (hundreds of MB of activations, freed and reallocated per layer) then varies by
    2–5× from run to run. A no-op where glibc's ``mallopt`` is not available.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: its maximum (fixed, no longer adapted)
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the heap's top back
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak extra memory during a block: CUDA's allocator peak, or resident memory sampled every 0.5 ms on CPU.

    On CPU the baseline is taken after returning freed heap memory to the OS; the
    figure is the growth of resident memory, which includes the inputs' gradients
    and any allocator slack.
    """

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _trim()
        self._base = _rss()
        self._stop = threading.Event()
        self._max = self._base

        def sample():
            while not self._stop.is_set():
                self._max = max(self._max, _rss())
                time.sleep(0.0005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss())
            self.peak = self._max - self._base
        return False


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


def write_report(out_dir, name: str, result: dict, text: str, plot=None) -> dict:
    """Write a benchmark's ``name.json`` (``result``), ``name.md`` (``text``) and, with ``plot``, ``name.png``
    (``plot(path)``) into ``out_dir`` (created if needed); print the text and the paths; return ``result``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(result, indent=1))
    paths[1].write_text(text)
    if plot is not None:
        paths.append(out / f"{name}.png")
        plot(paths[-1])
    print(text)
    print("wrote " + ", ".join(map(str, paths)))
    return result
