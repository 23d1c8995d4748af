"""The one timer of the benchmarks: interleaved rounds, device sync, and a load probe.

Machines are shared and noisy: contenders are timed in the same process, on the same
tensors, warm, in rounds that go over all of them in turn (so that a change of load
falls on every contender alike), and each figure is a median. The machine's load
average is read before and after a run (``load``) and goes into every report's
provenance.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from foveal.bench.memory import PeakMemory

__all__ = ["sync", "load", "timed", "time_interleaved", "time_call", "per_call"]


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def load() -> list[float] | None:
    """The machine's load average over 1, 5 and 15 minutes, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def timed(fn, device=None):
    """``(fn(), seconds)`` of one call (a one-off: a layout, plan or mask build, a model load)."""
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - start


def time_interleaved(fns: dict, device, *, min_runs: int = 3, max_runs: int = 25, min_seconds: float = 0.5,
                     slow: float = 2.0, slow_runs: int = 2, memory="warm", together: bool = False,
                     errors=(ValueError,), keep: bool = True) -> dict:
    """Time several functions in alternating rounds, so that a change of machine load hits them all alike.

    Each function is called once cold (``first_s``: compile, plan and mask building);
    ``memory="warm"`` adds one warm call under ``PeakMemory`` (``peak_bytes``, not timed),
    ``"cold"`` measures the cold call's peak instead, False none; then it is called once
    per round until it has ``min_runs`` warm runs summing to ``min_seconds`` (at most
    ``max_runs``; ``slow_runs`` runs when the cold call took over ``slow`` seconds). A
    finished function leaves the rounds, unless ``together``: then every function runs in
    every round until all are finished. A function whose cold call raises one of
    ``errors`` gets ``{"error": message, "exception": type name}``. Returns per name
    ``first_s``, ``median_s``, ``runs``, ``peak_bytes`` (with ``memory``) and ``value``
    (the last result; None unless ``keep``: results are then freed as soon as they are made).
    """
    out = {}
    for name, fn in fns.items():
        try:
            if memory == "cold":
                with PeakMemory(device) as mem:
                    value, first = timed(fn, device)
            else:
                value, first = timed(fn, device)
        except errors as e:
            out[name] = {"error": str(e), "exception": type(e).__name__}
            continue
        entry = {"first_s": first, "times": [], "slow": first > slow, "value": value if keep else None}
        value = None
        if memory == "cold":
            entry["peak_bytes"] = mem.peak
        elif memory:
            entry["value"] = value = None
            with PeakMemory(device) as mem:
                entry["value"], _ = timed(fn, device)
            entry["peak_bytes"] = mem.peak
            entry["value"] = entry["value"] if keep else None
        out[name] = entry

    def done(r):
        n = len(r["times"])
        return n >= (slow_runs if r["slow"] else max_runs) or (n >= min_runs and sum(r["times"]) >= min_seconds)

    live = [n for n in out if "error" not in out[n]]
    while live:
        for name in live:
            out[name]["value"] = None  # free the previous result before the next call
            value, t = timed(fns[name], device)
            out[name]["value"] = value if keep else None
            out[name]["times"].append(t)
            value = None
        if together:
            live = live if not all(done(out[n]) for n in live) else []
        else:
            live = [n for n in live if not done(out[n])]
    for r in out.values():
        if "error" not in r:
            times = r.pop("times")
            del r["slow"]
            r["median_s"], r["runs"] = statistics.median(times), len(times)
    return out


def time_call(fn, device, *, min_runs: int = 3, max_runs: int = 10, min_seconds: float = 0.5):
    """(first-call seconds, median warm seconds, runs) of ``fn()`` alone: ``time_interleaved`` of one function.

    Warm runs repeat until ``min_runs`` and ``min_seconds`` are both reached (at most
    ``max_runs``; one run only when the first call took over 5 s).
    """
    r = time_interleaved({"fn": fn}, device, min_runs=min_runs, max_runs=max_runs, min_seconds=min_seconds, slow=5.0,
                         slow_runs=1, memory=False, errors=())["fn"]
    return r["first_s"], r["median_s"], r["runs"]


def per_call(fn, calls: int = 200, device=None) -> float:
    """Median seconds of one call of a fast ``fn`` (microseconds: a decode step) over ``calls`` calls, after
    ``min(20, calls)`` warm-up calls."""
    for _ in range(min(20, calls)):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(calls))
