"""The native extension's loader: it loads where built, and says why not where it cannot (never an ImportError)."""

import subprocess
import sys

import pytest

from foveal.kernels import native

#: under FOVEAL_NATIVE=0 (the eager fallback's test run) the loader answers "disabled" first, by design
_enabled = pytest.mark.skipif(native._disabled(), reason=f"{native.ENV} disables the native kernels in this run")


def _reason(env: dict, code: str = "from foveal.kernels import native; print(native.why_unavailable())") -> str:
    import os

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


@_enabled
def test_the_makefile_built_it_and_it_loads_with_the_expected_interface():
    assert native.sources(), "csrc/ has no sources"
    assert native.why_unavailable() is None, native.why_unavailable()
    assert int(native.ops().abi_version()) == native.ABI


def test_disabled_by_the_environment_it_says_so():
    assert _reason({native.ENV: "0"}) == f"foveal's native kernels are disabled ({native.ENV}=0)"


@_enabled
def test_a_missing_library_is_named_with_the_command_that_builds_it(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "BUILD_DIR", tmp_path)
    monkeypatch.setattr(native, "_STATE", {})
    reason = native.why_unavailable()
    assert "is not built" in reason and "python -m foveal.kernels.native.build" in reason
    assert not native.available()
