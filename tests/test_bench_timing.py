"""The one timer, the one report writer and the one density solver of the benchmarks."""

import json
import subprocess

import pytest
import torch

from foveal.bench import report
from foveal.bench.density import solve_knob
from foveal.bench.timing import time_call, time_interleaved

CPU = torch.device("cpu")


def _recorder(calls, name, value=0.0):
    def fn():
        calls.append(name)
        return torch.tensor(value)

    return fn


def test_rounds_go_over_every_function_in_turn_and_finished_ones_leave():
    calls = []
    fns = {"a": _recorder(calls, "a"), "b": _recorder(calls, "b")}
    out = time_interleaved(fns, CPU, min_runs=2, max_runs=2, min_seconds=0.0, memory=False)
    assert calls == ["a", "b", "a", "b", "a", "b"]  # cold calls, then 2 rounds
    assert all(r["runs"] == 2 and r["median_s"] >= 0 and "value" in r for r in out.values())
    calls.clear()
    out = time_interleaved({"a": _recorder(calls, "a"), "b": _recorder(calls, "b")}, CPU, min_runs=1, max_runs=3,
                           min_seconds=0.0, slow=-1.0, slow_runs=1, memory=False)
    assert calls == ["a", "b", "a", "b"]  # both "slow": one run each


def test_together_keeps_every_function_in_every_round():
    calls = []
    fast, slow = _recorder(calls, "fast"), _recorder(calls, "slow")

    def slow_fn():
        slow()
        sum(range(20000))

    out = time_interleaved({"fast": fast, "slow": slow_fn}, CPU, min_runs=1, max_runs=4, min_seconds=1e9,
                           memory=False, together=True)
    assert out["fast"]["runs"] == out["slow"]["runs"] == 4


def test_errors_of_the_cold_call_are_results_and_values_can_be_freed():
    def bad():
        raise ValueError("refused: too large")

    out = time_interleaved({"bad": bad, "ok": lambda: torch.ones(3)}, CPU, min_runs=1, min_seconds=0.0, keep=False)
    assert out["bad"] == {"error": "refused: too large", "exception": "ValueError"}
    assert out["ok"]["value"] is None and out["ok"]["peak_bytes"] >= 0
    first, median, runs = time_call(lambda: None, CPU, min_runs=3, max_runs=3, min_seconds=0.0)
    assert runs == 3 and first >= 0 and median >= 0


def test_the_writer_adds_provenance_and_survives_without_git(tmp_path, monkeypatch, capsys):
    report.begin("foveal bench run x")
    report.save_partial(tmp_path, "x-cpu", [{"a": 1}])

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    result = report.write_report(tmp_path, "x-cpu", {"rows": [{"a": 1}]}, "table\n",
                                 {"": lambda p: p.write_bytes(b"png"), "part": lambda p: p.write_bytes(b"png")})
    p = result["provenance"]
    assert p["command"] == "foveal bench run x" and p["commit"] is None and p["threads"] == torch.get_num_threads()
    assert json.loads((tmp_path / "x-cpu.json").read_text())["provenance"] == json.loads(json.dumps(p))
    md = (tmp_path / "x-cpu.md").read_text()
    assert md.startswith("table\n\n_Run `foveal bench run x` at commit unknown") and "load average" in md
    assert (tmp_path / "x-cpu.png").exists() and (tmp_path / "x-cpu-part.png").exists()
    assert not (tmp_path / "x-cpu.partial.json").exists()
    assert report.with_provenance("t", result) == md.replace("table", "t")
    assert report.result_name("speed", "cpu") == "speed-cpu" and report.result_name("quality-lm") == "quality-lm"


def test_the_solver_bisects_monotone_knobs_and_scans_the_others():
    assert solve_knob(lambda k: k / 1000, 0.3004, 1, 1000) == (300, 0.3)
    u_shape = {k: abs(k - 50) / 50 for k in range(1, 101)}  # density falls, then rises again
    seen = []

    def density(k):
        seen.append(k)
        return None if k == 63 else u_shape[k]

    knob, d = solve_knob(density, 0.0, 1, 100, monotone=False)
    assert (knob, d) == (50, 0.0) and 63 in seen  # an invalid knob (None) is skipped
    with pytest.raises(ValueError, match="no knob in"):
        solve_knob(lambda k: None, 0.5, 1, 10, monotone=False)
