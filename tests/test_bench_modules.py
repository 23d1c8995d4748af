"""``foveal bench speed --suite modules``: the dense SDPA twin is exact, rows and files come out, bad input refused."""

import json

import pytest
import torch

from foveal.bench import modules as bm
from foveal.bias import RelativePositionBias
from foveal.cli import main
from foveal.functional import attend
from foveal.kernels.select import BACKENDS
from foveal.patterns import Window


def _dense(q, k, v, allowed, scale, bias):
    """Softmax attention from its definition: scores, bias, mask, softmax; (out, lse) in float64."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) * scale + bias.double()
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def _window_case(gen):
    """Swin-like windows (2, 3) on a 4x6 grid with a learned relative-position table, written with loops."""
    grid, win, heads = (4, 6), (2, 3), 4
    n = grid[0] * grid[1]
    table = torch.randn(heads, 3, 5, generator=gen, requires_grad=True)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    index = torch.zeros(n, n, 2, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            (qy, qx), (ky, kx) = divmod(i, grid[1]), divmod(j, grid[1])
            allowed[i, j] = qy // win[0] == ky // win[0] and qx // win[1] == kx // win[1]
            index[i, j] = torch.tensor([min(max(ky - qy, -1), 1) + 1, min(max(kx - qx, -2), 2) + 2])

    def dense_bias():
        return table[:, index[..., 0], index[..., 1]]

    return Window(grid, win), RelativePositionBias(grid, (1, 2), table), allowed, dense_bias, [table], heads


def _sequence_case(gen):
    """1-D windows of 20 on 300 tokens (two chunks of query rows) with a plain-function bias."""
    n = 300
    idx = torch.arange(n)
    allowed = (idx[:, None] // 20) == (idx[None, :] // 20)

    def bias(h, qi, ki):
        return (qi - ki).float() * 0.05 * (h + 1)

    def dense_bias():
        return bias(torch.arange(4)[:, None, None], idx[None, :, None], idx[None, None, :])

    return Window((n,), 20), bias, allowed, dense_bias, [], 4


@pytest.mark.parametrize("case", [_window_case, _sequence_case])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_dense_sdpa_backend_matches_the_definition(case, kv_heads):
    gen = torch.Generator().manual_seed(7)
    pattern, bias, allowed, dense_bias, params, heads = case(gen)
    n, d = pattern.n, 8
    q = torch.randn(2, heads, n, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, n, d, generator=gen, requires_grad=True) for _ in range(2))
    go, gl = torch.randn(2, heads, n, d, generator=gen), torch.randn(2, heads, n, generator=gen)
    with bm.dense_backends():
        out, lse = attend(q, k, v, pattern, bias=bias, scale=0.3, backend="bench-sdpa", return_lse=True)
        with torch.no_grad():  # bfloat16, loosely
            half = attend(*(t.bfloat16() for t in (q, k, v)), pattern, bias=bias, scale=0.3, backend="bench-sdpa")
    want, want_lse = _dense(q, k, v, allowed, 0.3, dense_bias())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(half.double(), want, atol=6e-2, rtol=6e-2)
    inputs = [q, k, v, *params]
    got = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), inputs)
    ref = torch.autograd.grad((want * go).sum() + (want_lse * gl).sum(), inputs)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def test_dense_backends_refuse_above_the_cap_and_unregister():
    q = k = v = torch.randn(1, 2, 64, 8)
    with bm.dense_backends(cap=1000):
        for name in ("bench-sdpa", "bench-reference"):
            with pytest.raises(ValueError, match="dense working set of about .* exceeds the 0.0 GiB cap"):
                attend(q, k, v, Window((64,), 8), backend=name)
    assert "bench-sdpa" not in BACKENDS and "bench-reference" not in BACKENDS
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        attend(q, k, v, Window((64,), 8), backend="bench-sdpa")


def test_use_backend_switches_every_submodule_and_restores():
    from foveal.nn.maxvit import MaxViTBlock

    block = MaxViTBlock(16, 2, 4)
    with pytest.raises(RuntimeError), bm.use_backend(block, "reference"):
        assert block.attn_block.attn.backend == block.attn_grid.attn.backend == "reference"
        raise RuntimeError
    assert block.attn_block.attn.backend == block.attn_grid.attn.backend == "auto"


def _tiny():
    from foveal.nn.ela import EfficientLocalAttention
    from foveal.nn.neighborhood import NeighborhoodAttention2D
    from foveal.nn.window import WindowAttention

    return [
        bm.ModuleCase("NA 3x3 + rpb", lambda: NeighborhoodAttention2D(16, 2, 3, rel_pos_bias=True), (8, 8), 16, 2,
                      True),
        bm.ModuleCase("Swin 4, shift 2", lambda: WindowAttention(16, 2, 4, shift_size=2), (8, 8), 16, 2, False),
        bm.ModuleCase("ELA", lambda: EfficientLocalAttention(16), (8, 8), 16, 2, True, attention=False),
    ]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(bm.MODULE_SUITES, "modules-tiny", _tiny)
    monkeypatch.setattr(bm, "MIN_SECONDS", 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny calls: two threads on a loaded 2-core machine only add waiting
    yield "modules-tiny"
    torch.set_num_threads(threads)


def test_tiny_suite_rows_exactness_and_files(tiny, tmp_path):
    result = bm.run_modules(tiny, str(tmp_path), "cpu")
    rows = result["rows"]
    assert len(rows) == 2 * 3 + 1
    assert all(r["status"] == "ok" and r["median_s"] > 0 and r["runs"] >= 2 for r in rows), rows
    for r in rows:
        if r["contender"] == bm.MIXER:
            assert r["vs_dense"] is None and r["max_abs_diff"] is None
        elif r["contender"] == "foveal reference":
            assert r["oracle"] is None and r["max_abs_diff"] is None  # it is the oracle
        else:
            assert r["oracle"] == "foveal reference"
            assert r["max_abs_diff"] < (1e-4 if r["direction"] == "fwd+bwd" else 1e-5), r
        if r["contender"] == "torch sdpa + mask":
            assert r["vs_dense"] == 1.0
    data = json.loads((tmp_path / "modules-cpu.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows)) and len(data["load_before"]) == 3
    assert (tmp_path / "modules-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "modules-cpu.md").read_text()
    assert "× dense SDPA" in md and "| NA 3x3 + rpb | fwd+bwd |" in md and "(vs reference)" in md
    (tmp_path / "modules-cpu.md").unlink()
    md_path, _ = bm.rerender(tmp_path / "modules-cpu.json")
    assert md_path.read_text() == md


def test_dense_rows_over_the_cap_are_skipped_with_the_reason(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(bm.MODULE_SUITES, "modules-tiny", lambda: _tiny()[1:2])
    monkeypatch.setattr(bm, "plot", lambda *args: None)
    rows = bm.run_modules(tiny, str(tmp_path), "cpu", cap_bytes=1000)["rows"]
    status = {r["contender"]: r["status"] for r in rows}
    assert status["foveal auto"] == "ok"
    for name in ("foveal reference", "torch sdpa + mask"):
        assert status[name].startswith("skipped: dense working set of about"), status
    auto = rows[0]
    assert auto["vs_dense"] is None and auto["max_abs_diff"] is None
    assert "dense skipped" in (tmp_path / "modules-cpu.md").read_text()


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"suite must be one of .*'modules', .*'modules-quick'.*got 'modules-huge'"):
        bm.run_modules("modules-huge", str(tmp_path))
    with pytest.raises(ValueError, match=r"contenders must be among .* for module suites, got \['natten'\]"):
        bm.run_modules("modules", str(tmp_path), "cpu", ["natten"])
    with pytest.raises(ValueError, match="min_seconds must be a number >= 0, got -1"):
        bm.run_modules("modules", str(tmp_path), "cpu", min_seconds=-1)
    with pytest.raises(ValueError, match="suite must be one of"):
        bm.run_modules("quick", str(tmp_path))
    assert main(["bench", "speed", "--suite", "modules", "--contenders", "nope", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())
