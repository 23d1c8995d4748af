"""Suite ``timm`` (``foveal bench run timm``): timm models converted to foveal against the originals.

Per model and resolution: forward time (eval, ``no_grad``, batch 1, float32; median of warm
runs, the two models timed in alternating rounds), peak memory during a forward, and the
largest logit difference. The converted model is ``foveal.integrations.timm.convert`` of a
copy of the original (same weights, random: nothing is downloaded). Resolutions: the
model's own (224² or 256²) and a high one (``timm-quick``: 2× per side, ``timm``: 4× per
side, 896² or 1024²). At the high resolution the original must run too: Swin is built
with ``strict_img_size=False`` (timm's own padded, dynamic-mask path) so that it does;
the others take those sizes as built. A model that cannot run a case gets the reason in
its row instead of numbers.
"""

from __future__ import annotations

import copy
import platform
import sys
import time

import torch

from foveal.bench.measure import progress
from foveal.bench.report import result_name, write_report
from foveal.bench.timing import load, time_interleaved

__all__ = ["TIMM_SUITES", "TIMM_MODELS", "SIZES", "cases", "run_timm", "run_suite", "format_report"]

#: timm name -> (extra create_model kwargs, native side)
TIMM_MODELS = {
    "swin_tiny_patch4_window7_224": (dict(strict_img_size=False), 224),
    "maxvit_pico_rw_256": ({}, 256),
    "maxvit_tiny_tf_224": ({}, 224),
    "halonet26t": ({}, 256),
    "focalnet_tiny_srf": ({}, 224),
    "davit_tiny": ({}, 224),
}
#: suite -> side multipliers of the native resolution
TIMM_SUITES = {"timm-quick": (1, 2), "timm": (1, 4), "timm-dry": (1,)}
#: the dry size's model: a tiny Swin (random weights) at 64²
DRY_MODELS = {"swin_tiny_patch4_window7_224": (dict(img_size=64, window_size=4, embed_dim=16, depths=(2, 2),
                                                    num_heads=(1, 2), strict_img_size=False), 64)}
#: registry sizes (``foveal bench run timm --size S``) → ``TIMM_SUITES``
SIZES = {"dry": "timm-dry", "quick": "timm-quick", "full": "timm"}


def _refusing(fn):
    """``fn`` with a refusal (timm asserts, shape errors) reported as ``ValueError`` (time_interleaved's error)."""

    def call():
        try:
            return fn()
        except (AssertionError, RuntimeError) as e:
            raise ValueError(f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'refused'}") from e

    return call


def _cases(suite, models, table):
    return [(name, table[name][1] * m) for name in models for m in TIMM_SUITES[suite]]


def cases(size: str) -> list[str]:
    """The cases of a size: model and input side."""
    suite = SIZES[size]
    table = DRY_MODELS if suite == "timm-dry" else TIMM_MODELS
    return [f"{name} {side}²" for name, side in _cases(suite, list(table), table)]


def run_suite(size: str, out_dir: str = "bench-out", *, device=None, contenders=None, limit=None) -> dict:
    """The registry's entry: ``run_timm`` of a size (dry: ``DRY_MODELS``, no least time)."""
    return run_timm(SIZES[size], out_dir, device, contenders, min_seconds=0.0 if size == "dry" else 1.0)


def run_timm(suite: str = "timm-quick", out_dir: str = "bench-out", device: str | None = None, contenders=None,
             *, min_seconds: float = 1.0) -> dict:
    """Run a timm suite; print the report; write ``timm-DEVICE.json`` and ``.md`` (``timm-cpu``) into ``out_dir``.

    ``contenders``: timm model names to run (default: all of ``TIMM_MODELS``; ``timm-dry``: ``DRY_MODELS``).
    """
    if suite not in TIMM_SUITES:
        raise ValueError(f"suite must be one of {sorted(TIMM_SUITES)}, got {suite!r}")
    table = DRY_MODELS if suite == "timm-dry" else TIMM_MODELS
    models = list(table) if contenders is None else list(dict.fromkeys(contenders))
    unknown = [m for m in models if m not in table]
    if unknown or not models:
        raise ValueError(f"contenders must be among {list(table)} for the timm suites, got {contenders!r}")
    try:
        import timm
    except ImportError as e:
        raise ValueError(f"the timm suites need timm (make install, or pip install timm): {e}") from e
    from foveal.integrations.timm import convert

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = _cases(suite, models, table)
    load_before = load()
    rows, start, built = [], time.perf_counter(), {}
    for i, (name, side) in enumerate(cases):
        progress(i, len(cases), f"{name} {side}²", start)
        if name not in built:
            built.clear()  # one model pair in memory at a time
            torch.manual_seed(0)
            original = timm.create_model(name, pretrained=False, **table[name][0]).eval().to(dev)
            built[name] = (original, convert(copy.deepcopy(original)))
        original, converted = built[name]
        x = torch.randn(1, 3, side, side, device=dev)

        def forward(model):
            with torch.no_grad():
                return model(x)

        timed = time_interleaved(
            {"timm": _refusing(lambda: forward(original)), "foveal": _refusing(lambda: forward(converted))},
            dev, min_runs=2, max_runs=10, min_seconds=min_seconds,
        )
        diff = None
        if all("value" in timed[k] and timed[k]["value"] is not None for k in ("timm", "foveal")):
            diff = float((timed["timm"]["value"] - timed["foveal"]["value"]).abs().max())
        for contender in ("timm", "foveal"):
            r = timed[contender]
            rows.append({
                "model": name, "side": side, "contender": contender, "max_abs_diff": diff,
                **({"error": r["error"]} if "error" in r else {
                    "first_s": r["first_s"], "median_s": r["median_s"], "runs": r["runs"], "peak_bytes": r["peak_bytes"],
                }),
            })
        del x
    progress(len(cases), len(cases), f"done in {time.perf_counter() - start:.0f}s", start)
    sys.stderr.write("\n")
    result = {
        "suite": suite,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"timm {timm.__version__}",
        "load_before": load_before,
        "load_after": load(),
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} foveal bench speed --suite {suite} --out {out_dir}",
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    return write_report(out_dir, result_name("timm", dev), result, format_report(result))


def _cell(row, field):
    if row is None or "error" in row:
        return "—"
    if field == "median_s":
        return f"{row['median_s'] * 1e3:.0f} ms"
    return f"{row['peak_bytes'] / 2**20:.0f} MB"


def format_report(result: dict) -> str:
    """The Markdown report: one line per model and resolution, timm against foveal, with ratios."""
    by = {(r["model"], r["side"], r["contender"]): r for r in result["rows"]}
    keys = list(dict.fromkeys((r["model"], r["side"]) for r in result["rows"]))
    lines = [
        f"# foveal bench speed --suite {result['suite']}",
        "",
        f"{result['device']}; {result['machine']}; load {result['load_before'][0]:.1f} before, "
        f"{result['load_after'][0]:.1f} after. `{result['command']}`",
        "",
        "Forward of one image, eval, float32: timm's model against the same model after "
        "`foveal.integrations.timm.convert` (same weights). Time: median of warm runs, the two in alternating "
        "rounds; memory: peak resident growth during one forward (CPU) or the allocator's peak (CUDA).",
        "",
        "| model | input | timm | foveal | foveal / timm | timm memory | foveal memory | max abs Δ logits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, side in keys:
        t, f = by.get((model, side, "timm")), by.get((model, side, "foveal"))
        ratio = "—"
        if t and f and "error" not in t and "error" not in f:
            ratio = f"{f['median_s'] / t['median_s']:.2f}×"
        diff = f["max_abs_diff"] if f else None
        lines.append(
            f"| {model} | {side}² | {_cell(t, 'median_s')} | {_cell(f, 'median_s')} | {ratio} | {_cell(t, 'peak')} "
            f"| {_cell(f, 'peak')} | {'—' if diff is None else f'{diff:.1e}'} |"
        )
    errors = [r for r in result["rows"] if "error" in r]
    if errors:
        lines += ["", "Cases that did not run:", ""]
        lines += [f"- {r['model']} {r['side']}², {r['contender']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"
