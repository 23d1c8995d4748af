"""Memory of a benchmark process: the peak extra memory of a block, and a steady heap for whole-model timings."""

from __future__ import annotations

import os
import threading
import time

import torch

__all__ = ["PeakMemory", "steady_heap"]


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
