"""The benchmark registry: every suite is listed, named as its file and its result, and runs from the CLI."""

import importlib
import json
from pathlib import Path

import pytest
import torch

from foveal.bench import registry
from foveal.cli import main

BENCH = Path(registry.__file__).parent


def test_every_suite_is_a_module_named_as_it_with_the_registry_sizes():
    for name, suite in registry.SUITES.items():
        assert suite.name == name and suite.kind in ("speed", "quality")
        assert (BENCH / f"{name.replace('-', '_')}.py").exists(), name
        module = importlib.import_module(suite.module)
        assert callable(module.run_suite)
        assert list(module.SIZES) == list(suite.sizes) and "dry" in suite.sizes, name
        assert suite.default_size != "dry"
        for size in suite.sizes:
            assert suite.cases(size) and all(isinstance(c, str) for c in suite.cases(size)), (name, size)


def test_cases_lists_what_a_command_would_run_and_runs_nothing(capsys, tmp_path):
    assert main(["bench", "run", "quality-real", "--size", "full", "--cases", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "quality-real full: smollm2-135m: full @ 1" and "quality-real full: minilm-l6: dhsa @ 0.2" in out
    assert main(["bench", "quality", "--suite", "quick", "--cases", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "quality-lm quick: passkey — window @ 0.25" in out and "quality-vision quick: cue-seg — global — seed 0" in out
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_the_older_command_lines_name_registered_suites_and_sizes():
    for what, names in registry.LEGACY.items():
        for old, runs in names.items():
            for name, size in runs:
                assert size in registry.get(name).sizes, (what, old)
    assert registry.resolve("speed", None) == [("speed", "quick")]
    assert registry.resolve("quality", "full") == [("quality-lm", "full"), ("quality-vision", "full")]
    with pytest.raises(ValueError, match="--suite must be one of"):
        registry.resolve("cp", "huge")


def test_list_prints_every_suite(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name, suite in registry.SUITES.items():
        shown = suite.name if suite.kind == "quality" else f"{name}-{suite.device or 'DEVICE'}"
        assert f"\n{name} " in f"\n{out}" and f"result: {shown}.json" in out


@pytest.mark.parametrize("argv", [["bench"], ["bench", "run"], ["bench", "run", "nope"],
                                  ["bench", "run", "speed", "--size", "huge"], ["bench", "speed", "--size", "dry"],
                                  ["bench", "run", "speed", "--suite", "quick"], ["bench", "quality", "--suite", "x"],
                                  ["bench", "run", "lm", "--size", "dry", "--contenders", "x"],
                                  ["bench", "run", "speed", "--size", "dry", "--limit", "2"],
                                  ["bench", "run", "quality-real", "--size", "dry", "--limit", "0"]])
def test_bad_command_lines_are_refused_before_any_work(argv, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny calls: two threads on a loaded 2-core machine only add waiting
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(registry.SUITES))
def test_every_suite_runs_its_dry_size_from_the_cli(name, tmp_path, one_thread, capsys):
    suite = registry.get(name)
    if suite.missing():
        pytest.skip(f"{name} needs {', '.join(suite.missing())} ({suite.install})")
    argv = ["bench", "run", name, "--size", "dry", "--out", str(tmp_path)]
    if suite.kind == "speed" and suite.device is None:
        argv += ["--device", "cpu"]
    assert main(argv) == 0
    result = suite.result_name("cpu")
    data = json.loads((tmp_path / f"{result}.json").read_text())
    assert data["rows"], name
    failed = [r for r in data["rows"] if str(r.get("status", "")).startswith("failed") or "error" in r]
    assert not failed, failed
    prov = data["provenance"]
    assert prov["command"] == "foveal " + " ".join(argv) and prov["torch"] == torch.__version__
    assert len(prov["load_before"]) == 3 and prov["date"]
    md = (tmp_path / f"{result}.md").read_text()
    assert "_Run `foveal bench run" in md
    assert not list(tmp_path.glob("*.partial.json"))
    if "png" in suite.plots:
        assert list(tmp_path.glob("*.png")), name
