"""``foveal bench run vision-calibration``: learning curves of one mixer on the vision tasks.

The calibration runs behind ``quality-vision``: a task ranks mixers only if full attention
(``global``) learns it within the budget. Each run trains the quality suite's tiny
backbone (stages of 24/48/64 channels, one block each, ``size``² images) with a mixer on
``train`` generated examples for ``steps`` steps of 32 (AdamW at ``lr``, warm-up then
cosine, one thread) and records the accuracy (mIoU for ``cue-seg``) on 500 of its training
examples and on 500 held-out ones at five points of the run. A task whose full-attention
curve stays at chance, on the training examples too, cannot rank mixers in this budget.
It replaces ``benchmarks/vision_calibration.py`` (one run per command line).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from foveal.bench.measure import progress
from foveal.bench.quality_vision import _build, evaluate
from foveal.bench.report import save_partial, write_report
from foveal.bench.train import Budget, fit
from foveal.bench.vision_tasks import TASKS

__all__ = ["Run", "SIZES", "cases", "run_suite"]

NAME = "vision-calibration"


@dataclass(frozen=True)
class Run:
    task: str
    size: int
    steps: int
    train: int
    seed: int = 0
    mixer: str = "global"
    lr: float = 3e-3
    #: ``match``'s glyph scale (None: the task's default)
    scale: int | None = None
    #: examples evaluated, of the training set and held out
    evaluated: int = 500
    dims: tuple[int, ...] = (24, 48, 64)


def _runs(task, size, steps, train, seeds=(0,), lr=3e-3, scale=None):
    return [Run(task, size, steps, train, seed, lr=lr, scale=scale) for seed in seeds]


#: registry sizes → runs; ``full``: the runs of BENCHMARKS.md's table (hours on a 2-core CPU)
SIZES = {
    "dry": [Run("cue-seg", 16, 5, 32, evaluated=16, dims=(8, 16, 16))],
    "quick": _runs("cue-seg", 16, 300, 2000),
    "full": (_runs("match", 32, 1000, 4000) + _runs("match", 32, 2000, 4000, (1, 2))
             + _runs("match", 32, 2000, 4000, lr=1e-3) + _runs("match", 32, 2000, 4000, scale=2)
             + _runs("match", 32, 4000, 8000, lr=1e-3, scale=2) + _runs("match", 16, 2000, 4000)
             + _runs("match", 16, 6000, 8000) + _runs("pathfinder", 32, 1000, 4000)
             + _runs("pathfinder", 32, 2000, 4000, (1, 2)) + _runs("pathfinder", 16, 2000, 4000)),
}


def _curve(run: Run, on_step) -> dict:
    task = TASKS[run.task]
    kw = {} if run.scale is None else {"scale": run.scale}
    xtr, ytr = task.make(run.train, size=run.size, seed=1, **kw)
    xte, yte = task.make(run.evaluated, size=run.size, seed=2, **kw)
    torch.manual_seed(run.seed)
    depth = (1,) * len(run.dims)
    model = _build(task, run.mixer, dict(img_size=run.size, dims=run.dims, depths=depth, heads=(2, 2, 4)[:len(depth)]))
    curve = []

    def step(i):
        on_step(i)
        if (i + 1) % max(1, run.steps // 5) == 0:
            curve.append((i + 1, evaluate(model, task, xtr[:run.evaluated], ytr[:run.evaluated]),
                          evaluate(model, task, xte, yte)))
            model.train()

    seconds = fit(model, xtr, ytr, torch.nn.functional.cross_entropy,
                  Budget(steps=run.steps, batch=32, lr=run.lr, seed=run.seed), step)
    return {**asdict(run), "metric": "mIoU" if task.kind == "segment" else "accuracy", "curve": curve,
            "train_value": curve[-1][1], "held_out_value": curve[-1][2], "train_s": seconds}


def report(result: dict) -> str:
    """Markdown: one line per run, its curve's end on training and held-out examples."""
    lines = [f"suite `{NAME}` size `{result['size']}`: the tiny backbone with one mixer, batch 32, one thread; "
             "value at the end of each run on training / held-out examples (curve: five points)", "",
             "| task | image | steps | training images | lr | seed | mixer | train / held-out "
             "| curve (step: held-out) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        task = r["task"] + (f", scale {r['scale']}" if r["scale"] else "")
        curve = ", ".join(f"{s}: {h:.2f}" for s, _, h in r["curve"])
        lines.append(f"| {task} | {r['size']}² | {r['steps']} | {r['train']} | {r['lr']:g} | {r['seed']} | "
                     f"{r['mixer']} | {r['train_value']:.2f} / {r['held_out_value']:.2f} | {curve} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path):
    """Held-out (solid) and training (dashed) value against step, one panel per task, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, r in enumerate(r for r in rows if r["task"] == task):
            steps, train, held = zip(*r["curve"])
            label = f"{r['size']}², {r['train']} ex, lr {r['lr']:g}, seed {r['seed']}" + \
                (f", scale {r['scale']}" if r["scale"] else "")
            colour = plt.get_cmap("tab10")(i % 10)
            ax.plot(steps, held, "-o", ms=3, color=colour, label=label)
            ax.plot(steps, train, "--", color=colour)
        ax.set_title(task)
        ax.set_xscale("log" if max(r["steps"] for r in rows) > 10 * min(r["steps"] for r in rows) else "linear")
        ax.set_xlabel("step")
        ax.set_ylabel(next(r["metric"] for r in rows if r["task"] == task))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cases(size: str) -> list[str]:
    """The cases of a size: one learning curve each."""
    return [f"{r.task} {r.size}² {r.mixer}, {r.steps} steps, {r.train} examples, lr {r.lr:g}, seed {r.seed}"
            + (f", scale {r.scale}" if r.scale else "") for r in SIZES[size]]


def run_suite(size: str, out_dir: str = "bench-out", *, device=None, contenders=None, limit=None) -> dict:
    """Train every run of a size; ``contenders``: mixers in place of ``global``; ``limit``: the first runs."""
    if device not in (None, "cpu"):
        raise ValueError("the vision-calibration suite trains on CPU: --device does not apply")
    runs = SIZES[size][:limit]
    if contenders:
        runs = [Run(**{**asdict(r), "mixer": m}) for r in runs for m in contenders]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total, done, start, rows = sum(r.steps for r in runs), 0, time.perf_counter(), []
    for run in runs:
        label = f"{run.task} {run.size}² {run.mixer} seed {run.seed}"
        rows.append(_curve(run, lambda i, base=done, label=label: progress(base + i + 1, total, label, start)))
        done += run.steps
        save_partial(out, NAME, rows)
    progress(total, total, f"done in {time.perf_counter() - start:.0f}s", start)
    sys.stderr.write("\n")
    result = {"suite": NAME, "size": size, "seconds": time.perf_counter() - start, "rows": rows}
    return write_report(out, NAME, result, report(result), lambda path: plot(rows, path))
