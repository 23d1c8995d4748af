"""foveal's native CPU kernels: a C++ extension built on the machine it runs on, loaded if present.

The Makefile builds it (``python -m foveal.kernels.native.build``) with torch's own
headers, ATen's ``Vectorized`` and ``at::parallel_for``; nothing is downloaded and no
build environment is made. Each source in ``csrc/`` registers its ops in the
``foveal_native`` op namespace (``TORCH_LIBRARY_FRAGMENT``), so ``torch.ops.foveal_native.NAME``
calls them. ``import foveal`` never needs it: without it the eager kernels answer, and
``why_unavailable()`` says why (disabled, not built, built from older sources, or the
loader's own message). ``FOVEAL_NATIVE=0`` disables it for a process (the eager fallback
stays tested that way).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available", "why_unavailable", "ops", "library_path", "sources", "common_reasons", "ENV"]

#: set to 0 (or false/off/no) to run without the native kernels
ENV = "FOVEAL_NATIVE"
NAME = "foveal_native"
#: the interface version the Python side expects (``csrc/abi.cpp``)
ABI = 1
HERE = Path(__file__).resolve().parent
#: where ``build`` writes the library (inside the package: one per checkout or install)
BUILD_DIR = HERE / "_build"

_STATE: dict = {}


def sources() -> list[Path]:
    """The C++ sources the extension is built from, in a fixed order."""
    return sorted((HERE / "csrc").glob("*.cpp"))


def library_path() -> Path:
    """The shared library ``build`` makes."""
    return BUILD_DIR / f"{NAME}.so"


def _disabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() in ("0", "false", "off", "no")


def _stale(lib: Path) -> list[str]:
    built = lib.stat().st_mtime
    return [p.name for p in sources() + sorted((HERE / "csrc").glob("*.h")) if p.stat().st_mtime > built]


def _load() -> str | None:
    """Load the library once; the reason it is unavailable, or None."""
    if "reason" in _STATE:
        return _STATE["reason"]
    reason = None
    lib = library_path()
    if not sources():
        reason = "foveal's native extension has no sources"
    elif not lib.exists():
        reason = f"foveal's native extension is not built ({lib} is missing): run `make` or " \
                 "`python -m foveal.kernels.native.build`"
    elif _stale(lib):
        reason = f"foveal's native extension was built from older sources ({', '.join(_stale(lib))} changed since): " \
                 "run `make` or `python -m foveal.kernels.native.build`"
    else:
        import torch

        try:
            torch.ops.load_library(str(lib))
            abi = int(getattr(torch.ops, NAME).abi_version())
        except (OSError, RuntimeError, AttributeError) as e:
            reason = f"foveal's native extension could not be loaded: {e}"
        else:
            if abi != ABI:
                reason = f"foveal's native extension has interface version {abi}, this foveal needs {ABI}: rebuild it"
    _STATE["reason"] = reason
    return reason


def why_unavailable() -> str | None:
    """Why the native kernels cannot run in this process (None: they can)."""
    if _disabled():
        return f"foveal's native kernels are disabled ({ENV}={os.environ.get(ENV)})"
    return _load()


def available() -> bool:
    """True when the native kernels can run in this process."""
    return why_unavailable() is None


def ops():
    """The ``torch.ops.foveal_native`` namespace (``RuntimeError`` with the reason when unavailable)."""
    reason = why_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    import torch

    return getattr(torch.ops, NAME)


def common_reasons(q, kernel: str) -> list[str]:
    """What every native kernel needs of a call: the library loaded, CPU tensors, a floating dtype (half inputs
    computed in float32); ``kernel`` names it in the reasons."""
    reasons = []
    why = why_unavailable()
    if why is not None:
        reasons.append(why)
    if q.device.type != "cpu":
        reasons.append(f"{kernel} runs on CPU tensors, got {q.device.type}")
    from foveal.inputs import DTYPES

    if q.dtype not in DTYPES:
        reasons.append(f"{kernel} computes float32/float64 (half inputs in float32), got {q.dtype}")
    return reasons
