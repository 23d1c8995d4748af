"""``foveal bench speed`` on a tiny suite: every output is written and every foveal backend is exact."""

import json

import pytest
import torch

from foveal.bench import speed
from foveal.bench.speed import Case
from foveal.cli import main
from foveal.patterns import Neighborhood, SlidingWindow


@pytest.fixture
def tiny_suite(monkeypatch):
    monkeypatch.setitem(
        speed.SUITES,
        "tiny",
        lambda: [
            Case("na", Neighborhood((12, 12), 5), heads=2, head_dim=16),
            Case("na", Neighborhood((16, 16), 5), heads=2, head_dim=16, backward=True),
            Case("window", SlidingWindow(300, 32), heads=2, head_dim=16),
        ],
    )
    return "tiny"


def test_speed_writes_table_json_and_plot(tiny_suite, tmp_path, capsys):
    names = ["foveal cpu", "foveal auto", "foveal reference", "torch sdpa + bool mask", "torch sdpa (dense)", "natten"]
    result = speed.run_speed(tiny_suite, str(tmp_path), "cpu", names)
    rows = result["rows"]
    assert len(rows) == 3 * len(names)
    data = json.loads((tmp_path / "speed-cpu.json").read_text())
    assert data["matmul_flops"] > 0 and len(data["rows"]) == len(rows)
    assert (tmp_path / "speed-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "speed-cpu.md").read_text()
    assert "× foveal auto" in md and "share of matmul" in md
    for r in rows:
        if r["contender"].startswith("foveal") and r["status"] == "ok":
            assert r["max_abs_err"] < 1e-5, r
            assert 0 < r["share_of_matmul"] and r["median_s"] > 0
    # skips say why
    natten_bwd = [r for r in rows if r["contender"] == "natten" and r["direction"] == "fwd+bwd"][0]
    assert natten_bwd["status"] == "skipped: NATTEN refuses gradients on CPU"
    assert "foveal bench speed" not in capsys.readouterr().err  # progress only, no errors


def test_speed_refuses_unknown_suite_and_contender(tmp_path):
    with pytest.raises(ValueError, match="suite must be one of"):
        speed.run_speed("huge", str(tmp_path))
    assert main(["bench", "speed", "--suite", "quick", "--contenders", "nope", "--out", str(tmp_path)]) == 2


def test_rerender_rebuilds_report_from_json(tiny_suite, tmp_path):
    speed.run_speed(tiny_suite, str(tmp_path), "cpu", ["foveal cpu", "foveal auto"])
    (tmp_path / "speed-cpu.md").unlink()
    (tmp_path / "speed-cpu.png").unlink()
    md, png = speed.rerender(tmp_path / "speed-cpu.json")
    assert "foveal cpu" in md.read_text() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cp_refuses_an_unknown_suite(tmp_path):
    from foveal.cli import main

    assert main(["bench", "cp", "--suite", "nope", "--out", str(tmp_path)]) == 2


def test_bench_quality_refuses_an_unknown_suite(tmp_path):
    from foveal.cli import main

    assert main(["bench", "quality", "--suite", "nope", "--out", str(tmp_path)]) == 2


def test_lm_suite_writes_ratios_targets_json_and_plot(tmp_path, monkeypatch):
    from foveal.bench import lm as lm_speed

    monkeypatch.setitem(lm_speed.LM_SUITES, "tiny", lm_speed._suite((256,), (64, 128), min_seconds=0.0, calls=3))
    result = lm_speed.run_lm("tiny", str(tmp_path), "cpu")
    rows = result["rows"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    names = {r["contender"] for r in rows if r["kind"] == "prefill"}
    assert names == {row.name for row in lm_speed.PREFILL_ROWS}
    assert {r["direction"] for r in rows if r["kind"] == "prefill"} == {"fwd", "fwd+bwd"}
    assert {r["context"] for r in rows if r["kind"] == "decode"} == {64, 128}
    sel = [r for r in rows if r["contender"] == "vertical-slash, selection made beforehand"]
    assert all(0 < r["density"] <= 1 and r["select_s"] > 0 for r in sel)
    md = (tmp_path / "lm-cpu.md").read_text()
    assert "Targets:" in md and "× SDPA" in md and "decode" in md
    assert json.loads((tmp_path / "lm-cpu.json").read_text())["suite"] == "tiny"
    assert (tmp_path / "lm-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_user_masks_of_the_flex_anchors_are_exact():
    from foveal.bench.contenders import user_mask_mod
    from foveal.patterns import Causal, Sinks

    for p in (Neighborhood((9, 11), 3), Neighborhood((12, 7), (5, 3)), SlidingWindow(70, 9), Causal(33),
              SlidingWindow(50, 7) | Sinks(50, 4)):
        fn = user_mask_mod(p)
        q, k = torch.arange(p.n)[:, None], torch.arange(p.n)[None, :]
        assert torch.equal(fn(0, 0, q, k).expand(p.n, p.n), p.dense_mask()), p
    assert user_mask_mod(Neighborhood((9, 9), 3, dilation=2)) is None
