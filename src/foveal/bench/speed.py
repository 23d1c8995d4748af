"""Suite ``speed`` (``foveal bench run speed``): every contender on the same tensors, in one process.

For each case (a pattern, batch, heads, head_dim, dtype, forward or forward+backward)
each contender is timed warm (median of several runs), with its one-off setup
(layout, plan or mask build) and its compile time (first call less a warm one) in
their own columns, its peak extra memory, its *useful* FLOP/s (4·head_dim per pair
the pattern allows, ×3.5 with the backward pass, as FlashAttention counts) and that
as a share of the same run's dense matmul rate, and the largest difference from the
exact reference on 256 sampled query rows.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from foveal.bench.contenders import CONTENDERS, Prepared
from foveal.bench.measure import matmul_rate, progress, target_line
from foveal.bench.report import result_name, with_provenance, write_report
from foveal.bench.timing import time_interleaved
from foveal.kernels.reference import reference_attention
from foveal.patterns import Neighborhood, Sinks, SlidingWindow

__all__ = ["Case", "SUITES", "SIZES", "cases", "run_speed", "run_suite"]


@dataclass
class Case:
    family: str  # cases of one family differ in size; plotted as one line per contender
    pattern: object
    heads: int = 4
    head_dim: int = 64
    batch: int = 1
    dtype: torch.dtype = torch.float32
    backward: bool = False

    @property
    def label(self) -> str:
        return f"{self.family} n={self.pattern.n} {'fwd+bwd' if self.backward else 'fwd'}"


def _na(grid, k):
    return Neighborhood(grid, k)


def _sw(n, w):
    return SlidingWindow(n, w)


def _quick():
    return [
        Case("neighborhood 2-D 7x7", _na((64, 64), 7), heads=4),
        Case("neighborhood 2-D 7x7", _na((64, 64), 7), heads=4, backward=True),
        Case("causal window 512", _sw(8192, 512), heads=8),
    ]


def _targets():
    """The native-kernel issue's speed cases: NA 7x7 on 64² and a causal window of 512 at 16k, fwd and fwd+bwd."""
    return [
        Case("neighborhood 2-D 7x7", _na((64, 64), 7), heads=4),
        Case("neighborhood 2-D 7x7", _na((64, 64), 7), heads=4, backward=True),
        Case("causal window 512", _sw(16384, 512), heads=8),
        Case("causal window 512", _sw(16384, 512), heads=8, backward=True),
    ]


def _full():
    cases = []
    for side in (32, 64, 128):
        for bwd in (False, True):
            cases.append(Case("neighborhood 2-D 7x7", _na((side, side), 7), heads=4, backward=bwd))
    for side in (16, 24, 32):
        for bwd in (False, True):
            cases.append(Case("neighborhood 3-D 3x3x3", _na((side,) * 3, 3), heads=4, backward=bwd))
    for n in (4096, 16384, 65536):
        for bwd in (False, True):
            cases.append(Case("causal window 512", _sw(n, 512), heads=8, backward=bwd))
    for n in (4096, 16384):
        cases.append(Case("streaming window 512 + 4 sinks", SlidingWindow(n, 512) | Sinks(n, 4), heads=8))
    cases.append(Case("causal window 256 (memory)", _sw(65536, 256), heads=4, backward=True))
    return cases


def _dry():
    return [
        Case("neighborhood 2-D 3x3", _na((8, 8), 3), heads=2, head_dim=16),
        Case("causal window 32", _sw(256, 32), heads=2, head_dim=16, backward=True),
    ]


SUITES = {"quick": _quick, "full": _full, "dry": _dry, "targets": _targets}
#: registry sizes (``foveal bench run speed --size S``) → ``SUITES``
SIZES = {"dry": "dry", "quick": "quick", "full": "full", "targets": "targets"}
#: the dry size's contenders (compiled flex alone would take a minute)
DRY_CONTENDERS = ["foveal cpu", "foveal auto", "torch sdpa (dense)"]


def _reference_rows(q, k, v, pattern, rows):
    """Exact outputs of the sampled query ``rows`` (O(rows · N))."""
    mask = pattern.mask(rows[:, None], torch.arange(pattern.n_kv, device=q.device)[None, :])
    out, _ = reference_attention(q[:, :, rows], k, v, mask, q.shape[-1] ** -0.5)
    return out


def _fresh(case: Case) -> Case:
    """The case with a new pattern object, so no contender finds another's cached layout or plan."""
    import dataclasses

    import foveal.patterns as P

    pattern = eval(repr(case.pattern), {"__builtins__": {}}, {n: getattr(P, n) for n in P.__all__})
    return dataclasses.replace(case, pattern=pattern)


def _failed(e: Exception) -> str:
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _measure_case(case: Case, contenders, device, rate) -> list[dict]:
    """Every contender on the same tensors, timed in interleaved rounds (``timing.time_interleaved``).

    Each contender prepares its call on its own copy of the pattern (``_fresh``), so that
    none finds another's cached layout or plan; its peak memory is that of its cold call.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (case.batch, case.heads, case.pattern.n, case.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=case.dtype).to(device) for _ in range(3))
    grad = torch.randn(shape, generator=gen, dtype=case.dtype).to(device)
    check = torch.randperm(case.pattern.n, generator=gen)[:256].to(device)
    if case.backward:
        for t in (q, k, v):
            t.requires_grad_(True)
    base = {"case": case.label, "family": case.family, "tokens": case.pattern.n, "pattern": repr(case.pattern),
            "direction": "fwd+bwd" if case.backward else "fwd"}
    rows, prepared, fns = {}, {}, {}
    for contender in contenders:
        rows[contender.name] = {**base, "contender": contender.name}
        try:
            p = contender.prepare(_fresh(case), q, k, v)
        except Exception as e:  # a contender failing is a result, not a crash of the benchmark
            rows[contender.name]["status"] = _failed(e)
            continue
        if not isinstance(p, Prepared):
            rows[contender.name]["status"] = f"skipped: {p}"
            continue
        prepared[contender.name] = p
        if case.backward:
            fns[contender.name] = lambda p=p: torch.autograd.grad(p.forward(), (q, k, v), grad)
        else:
            fns[contender.name] = lambda p=p: _no_grad(p.forward)
    timed = time_interleaved(fns, device, min_runs=3, max_runs=10, min_seconds=0.5, slow=5.0, slow_runs=1,
                             memory="cold", errors=(Exception,), keep=False)
    want = None
    pairs = case.pattern.num_allowed() * case.batch * case.heads
    useful = 4 * case.head_dim * pairs * (3.5 if case.backward else 1.0)
    for name, t in timed.items():
        row = rows[name]
        if "error" in t:
            row["status"] = f"failed: {t['exception']}: {t['error'].splitlines()[0][:120] if t['error'] else ''}"
            continue
        err = None
        try:
            if prepared[name].comparable:
                with torch.no_grad():
                    out = prepared[name].forward()
                    if want is None:
                        want = _reference_rows(q.detach(), k.detach(), v.detach(), case.pattern, check)
                err = (out[:, :, check].float() - want.float()).abs().max().item()
        except Exception as e:
            row["status"] = _failed(e)
            continue
        median = t["median_s"]
        row.update(status="ok", median_s=median, first_s=t["first_s"], runs=t["runs"],
                   setup_s=prepared[name].setup_seconds, compile_s=max(t["first_s"] - median, 0.0),
                   peak_bytes=t["peak_bytes"], useful_flops=useful / median, share_of_matmul=useful / median / rate,
                   max_abs_err=err)
    return list(rows.values())


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def _fmt_time(s):
    return "—" if s is None else (f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s")


def _fmt_bytes(b):
    return "—" if b is None else f"{b / 2**20:.0f} MiB"


def format_table(rows) -> str:
    """Markdown table, one block per case, with time as a ratio to ``foveal auto`` of the same case."""
    lines = []
    for label in dict.fromkeys(r["case"] for r in rows):
        case_rows = [r for r in rows if r["case"] == label]
        auto = next((r for r in case_rows if r["contender"] == "foveal auto" and r["status"] == "ok"), None)
        lines += [f"\n**{label}** — `{case_rows[0]['pattern']}`\n",
                  "| contender | time | × foveal auto | setup | compile | peak mem | useful GFLOP/s | share of matmul | max abs err |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in case_rows:
            if r["status"] != "ok":
                lines.append(f"| {r['contender']} | {r['status']} | | | | | | | |")
                continue
            ratio = f"{r['median_s'] / auto['median_s']:.2f}" if auto else "—"
            err = "n/a (full attention)" if r["max_abs_err"] is None else f"{r['max_abs_err']:.1e}"
            lines.append(
                f"| {r['contender']} | {_fmt_time(r['median_s'])} | {ratio} | {_fmt_time(r['setup_s'])} | "
                f"{_fmt_time(r['compile_s']) if r['compile_s'] > 0.05 else '—'} | {_fmt_bytes(r['peak_bytes'])} | "
                f"{r['useful_flops'] / 1e9:.1f} | {r['share_of_matmul']:.1%} | {err} |"
            )
    return "\n".join(lines)


def _find(rows, family, tokens, direction, contender):
    for r in rows:
        if (r["family"], r["tokens"], r["direction"], r["contender"]) == (family, tokens, direction, contender):
            return r if r["status"] == "ok" else None
    return None


def targets(rows) -> str:
    """The issue's speed targets as ratios from this run (where the cases were run)."""
    out = []

    def ratio(a, b, text, goal):
        if a and b:
            x = a["median_s"] / b["median_s"]
            out.append(target_line(x, text, goal, 3))

    na = ("neighborhood 2-D 7x7", 4096)
    auto_f = _find(rows, *na, "fwd", "foveal auto")
    ratio(auto_f, _find(rows, *na, "fwd", "flex + create_block_mask (user mask)"),
          "NA 7×7 64² fwd: foveal auto / compiled flex (attention-gym's natten mask)", 0.08)
    ratio(auto_f, _find(rows, *na, "fwd", "flex + create_block_mask"),
          "NA 7×7 64² fwd: foveal auto / compiled flex (foveal's mask_mod)", 0.08)
    ratio(auto_f, _find(rows, *na, "fwd", "natten"), "NA 7×7 64² fwd: foveal auto / NATTEN", 0.01)
    ratio(_find(rows, *na, "fwd+bwd", "foveal auto"), _find(rows, *na, "fwd+bwd", "torch sdpa (dense)"),
          "NA 7×7 64² fwd+bwd: foveal auto / dense SDPA", 0.05)
    windows = sorted({r["tokens"] for r in rows if r["family"] == "causal window 512"})
    for n in windows:  # the case is 16k (full); quick runs 8k
        sw = ("causal window 512", n, "fwd")
        flex, auto = _find(rows, *sw, "flex + create_block_mask"), _find(rows, *sw, "foveal auto")
        ratio(auto, flex, f"window 512, {n // 1024}k fwd: foveal auto / compiled flex kernel", 0.5)
        ratio(_find(rows, *sw, "foveal cpu"), flex, f"window 512, {n // 1024}k fwd: foveal cpu / compiled flex kernel",
              1.0)
        if auto:
            x = auto["share_of_matmul"]
            out.append(f"- window 512, {n // 1024}k fwd: foveal auto's useful FLOP/s, share of the run's matmul rate: "
                       f"{x:.0%} (target ≥ 70%) — {'met' if x >= 0.7 else 'NOT met'}")
    sw = ("causal window 512", 16384, "fwd")
    flex = _find(rows, *sw, "flex + create_block_mask")
    for name, what in (("foveal flex", "BlockLayout + to_flex"), ("foveal cpu", "cpu gather plan (layout, key sets and masks)")):
        mine = _find(rows, *sw, name)
        if mine and flex:
            x = mine["setup_s"] / flex["setup_s"]
            out.append(f"- window 512, 16k: {what} build / create_block_mask: {x:.4f}× (target ≤ 0.01×) — "
                       f"{'met' if x <= 0.01 else 'NOT met'}")
    mem = _find(rows, "causal window 256 (memory)", 65536, "fwd+bwd", "foveal auto")
    if mem:
        out.append(f"- window 256, 64k tokens, fwd+bwd, default backend: peak extra memory "
                   f"{mem['peak_bytes'] / 2**30:.2f} GiB (target < 2 GiB) — {'met' if mem['peak_bytes'] < 2 * 2**30 else 'NOT met'}")
    return "\n".join(out)


def plot(rows, path: Path, rate: float):
    """Time against tokens, log–log, one panel per (family, direction), one line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["family"], r["direction"]) for r in rows))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    cols = 2
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(12, 4.2 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, (family, direction) in zip(axes.flat, panels):
        for name in names:
            pts = sorted((r["tokens"], r["median_s"]) for r in rows
                         if (r["family"], r["direction"], r["contender"]) == (family, direction, name) and r["status"] == "ok")
            if pts:
                style = "-" if name.startswith("foveal") else "--"
                ax.plot(*zip(*pts), style, marker="o", label=name, color=colours[name])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{family} — {direction}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("median time (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"foveal bench speed — same-run matmul rate {rate / 1e9:.0f} GFLOP/s (solid: foveal)")
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(result: dict) -> str:
    rate = result["matmul_flops"]
    header = (f"suite `{result['suite']}` on {result['device']} ({result['machine']}); "
              f"dense float32 matmul in the same run: {rate / 1e9:.0f} GFLOP/s")
    summary = targets(result["rows"])
    return f"{header}\n{format_table(result['rows'])}\n\n{('Targets:' + chr(10) + summary) if summary else ''}\n"


def cases(size: str) -> list[str]:
    """The cases of a size, as the report labels them."""
    return [c.label for c in SUITES[SIZES[size]]()]


def run_suite(size: str, out_dir: str = "bench-out", *, device=None, contenders=None, limit=None) -> dict:
    """The registry's entry: ``run_speed`` of a size (dry: ``DRY_CONTENDERS`` unless others are named)."""
    if size == "dry" and contenders is None:
        contenders = DRY_CONTENDERS
    return run_speed(SIZES[size], out_dir, device, contenders)


def rerender(json_path):
    """Rewrite the Markdown report and the plot of a saved run (``*.json``) without measuring again."""
    path = Path(json_path)
    result = json.loads(path.read_text())
    path.with_suffix(".md").write_text(with_provenance(_report(result), result))
    plot(result["rows"], path.with_suffix(".png"), result["matmul_flops"])
    return path.with_suffix(".md"), path.with_suffix(".png")


def run_speed(suite: str = "quick", out_dir: str = "bench-out", device: str | None = None, contenders=None) -> dict:
    """Run a size of the ``speed`` suite (``SUITES``: quick, full); print the table; write ``speed-DEVICE.json``,
    ``.md`` and ``.png`` (``speed-cpu``) into ``out_dir``."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chosen = [c for c in CONTENDERS if contenders is None or c.name in contenders]
    if contenders is not None and len(chosen) != len(set(contenders)):
        known = [c.name for c in CONTENDERS]
        raise ValueError(f"contenders must be among {known}, got {sorted(contenders)}")
    cases = SUITES[suite]()
    rate = matmul_rate(dev, torch.float32)
    rows, start = [], time.perf_counter()
    for i, case in enumerate(cases):
        progress(i, len(cases), f"{case.label} — {len(chosen)} contenders in interleaved rounds")
        rows += _measure_case(case, chosen, dev, rate)
    progress(len(cases), len(cases), f"done in {time.perf_counter() - start:.0f}s")
    sys.stderr.write("\n")
    result = {
        "suite": suite,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "matmul_flops": rate,
        "rows": rows,
    }
    return write_report(out_dir, result_name("speed", dev), result, _report(result),
                        lambda path: plot(rows, path, rate))
