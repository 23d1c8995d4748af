"""Suite ``quality-vision``: which token mixer learns local + long-range tasks best.

The tiny backbone (``foveal.models``) is trained with each mixer under one fixed budget, once per seed,
on the synthetic tasks of ``vision_tasks``; the report gives accuracy (mIoU for the dense task) as mean ±
standard deviation over the seeds, parameters, forward FLOPs per image and training time per mixer, as a
table, JSON and a plot of quality against FLOPs. A task ranks mixers only when full attention (``global``)
learns it within the budget (``CALIBRATION``); every report says, per task, whether it did. ``vision``
holds the calibrated tasks, ``vision-hard`` the ones full attention did not learn on a CPU budget.
"""

from __future__ import annotations

import time
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from foveal.bench.report import save_partial
from foveal.bench.train import Budget, finish_report, fit, progress
from foveal.bench.vision_tasks import TASKS
from foveal.models import Classifier, Segmenter, mixer_names

__all__ = ["Suite", "SUITES", "SIZES", "CALIBRATION", "cases", "run_vision_quality", "run_suite", "evaluate",
           "flops_per_image", "summarise", "calibration"]


@dataclass(frozen=True)
class Suite:
    """Tasks × mixers × seeds under one budget; ``steps`` overrides ``budget.steps`` per task."""

    tasks: tuple[str, ...]
    mixers: tuple[str, ...]
    train: int
    test: int
    budget: Budget
    model: dict = field(default_factory=dict)
    #: each (task, mixer) is trained once per seed (model initialisation and minibatch order; the data are fixed)
    seeds: tuple[int, ...] = (0,)
    steps: dict = field(default_factory=dict)

    def budget_for(self, task: str, seed: int) -> Budget:
        return replace(self.budget, steps=self.steps.get(task, self.budget.steps), seed=seed)


#: what full attention (``global``) must reach on a task for the task to rank mixers (its calibration)
CALIBRATION = {"pathfinder": 0.9, "match": 0.9, "cue-seg": 0.9}

_SMALL = dict(img_size=32, dims=(24, 48, 64), depths=(1, 1, 1), heads=(2, 2, 4))
SUITES = {
    # a check of the whole pipeline in a few minutes: too few steps for the models to learn much
    "vision-quick": Suite(tuple(TASKS), tuple(mixer_names()), 256, 64, Budget(steps=20, batch=16),
                          dict(img_size=16, dims=(16, 32), depths=(1, 1), heads=(2, 2))),
    # the calibrated tasks: full attention reaches CALIBRATION within the budget (BENCHMARKS.md)
    "vision": Suite(("cue-seg",), tuple(mixer_names()), 4000, 500, Budget(steps=250, batch=32, lr=3e-3), _SMALL,
                    seeds=(0, 1, 2)),
    # not calibrated: full attention stayed at chance on these (1,000 to 6,000 steps, 16² and 32², BENCHMARKS.md)
    "vision-hard": Suite(("pathfinder", "match"), tuple(mixer_names()), 8000, 500,
                         Budget(steps=2000, batch=32, lr=3e-3), _SMALL, seeds=(0, 1, 2)),
    # two steps of two mixers on 16² images: a check that the pipeline runs
    "vision-dry": Suite(("cue-seg",), ("neighborhood", "global"), 16, 8, Budget(steps=2, batch=4),
                        dict(img_size=16, dims=(8, 16), depths=(1, 1), heads=(2, 2))),
}
#: registry sizes (``foveal bench run quality-vision --size S``) → ``SUITES``
SIZES = {"dry": "vision-dry", "quick": "vision-quick", "full": "vision", "hard": "vision-hard"}


def _build(task, mixer: str, model: dict):
    cls = Classifier if task.kind == "classify" else Segmenter
    return cls(task.num_classes, mixer=mixer, in_chans=1, **model)


def flops_per_image(model: torch.nn.Module, image: torch.Tensor) -> int:
    """Forward FLOPs for one image, counted by ``torch.utils.flop_counter`` (work done, not work needed)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    training = model.training
    model.eval()  # batch norms cannot run on one image in training mode
    try:
        with torch.no_grad(), counter:
            model(image[:1])
    finally:
        model.train(training)
    return int(counter.get_total_flops())


@torch.no_grad()
def evaluate(model, task, images, labels, batch: int = 128) -> float:
    """Accuracy (classification) or mean IoU over the classes (segmentation) on held-out data."""
    model.eval()
    preds = torch.cat([model(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
    if task.kind == "classify":
        return (preds == labels).float().mean().item()
    ious = []
    for c in range(task.num_classes):
        inter = ((preds == c) & (labels == c)).sum().item()
        union = ((preds == c) | (labels == c)).sum().item()
        if union:
            ious.append(inter / union)
    return sum(ious) / len(ious)


def _run_one(task, mixer, spec, budget, data, on_step) -> dict:
    row = {"task": task.name, "mixer": mixer, "seed": budget.seed, "steps": budget.steps,
           "metric": "accuracy" if task.kind == "classify" else "mIoU"}
    try:
        torch.manual_seed(budget.seed)
        model = _build(task, mixer, spec.model)
    except (ImportError, AttributeError) as e:
        return {**row, "status": f"unavailable: {e}"}
    (xtr, ytr), (xte, yte) = data
    loss = torch.nn.functional.cross_entropy
    row["params"] = sum(p.numel() for p in model.parameters())
    row["flops"] = flops_per_image(model, xte)
    try:
        row["train_s"] = fit(model, xtr, ytr, loss, budget, on_step)
    except FloatingPointError as e:
        return {**row, "status": f"diverged: {e}"}
    row["value"] = evaluate(model, task, xte, yte)
    row["status"] = "ok"
    return row


def summarise(rows) -> list[dict]:
    """One entry per (task, mixer): mean, standard deviation, min and max of the value over its seeds."""
    out = {}
    for r in rows:
        e = out.setdefault((r["task"], r["mixer"]), {"task": r["task"], "mixer": r["mixer"], "metric": r["metric"],
                                                   "values": [], "status": "ok", "train_s": 0.0})
        if r.get("status") == "ok":
            e["values"].append(r["value"])
            e["train_s"] += r["train_s"]
            e["params"], e["flops"] = r["params"], r["flops"]
        else:
            e["status"] = r.get("status", "?")
    for e in out.values():
        v = e["values"]
        if v:
            e.update(mean=statistics.fmean(v), std=statistics.stdev(v) if len(v) > 1 else 0.0, min=min(v), max=max(v))
    return list(out.values())


def calibration(rows) -> dict:
    """Per task with a ``global`` row: full attention's mean over seeds against ``CALIBRATION``."""
    out = {}
    for e in summarise(rows):
        if e["mixer"] == "global" and "mean" in e:
            need = CALIBRATION.get(e["task"])
            out[e["task"]] = {"global": e["mean"], "needed": need, "calibrated": need is not None and e["mean"] >= need}
    return out


def _cell(e) -> str:
    if "mean" not in e:
        return e["status"][:40]
    if len(e["values"]) == 1:
        return f"{e['mean']:.3f}"
    return f"{e['mean']:.3f} ± {e['std']:.3f} ({e['min']:.2f}–{e['max']:.2f})"


def format_table(rows) -> str:
    summary = summarise(rows)
    tasks = list(dict.fromkeys(e["task"] for e in summary))
    mixers = list(dict.fromkeys(e["mixer"] for e in summary))
    by = {(e["task"], e["mixer"]): e for e in summary}
    metric = {t: next(e["metric"] for e in summary if e["task"] == t) for t in tasks}
    seeds = sorted({r["seed"] for r in rows})
    head = ["mixer"] + [f"{t} ({metric[t]})" for t in tasks] + ["params", "MFLOPs/img", "train s (sum)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in mixers:
        cells = [m]
        first = next((e for e in summary if e["mixer"] == m and "params" in e), {})
        for t in tasks:
            e = by.get((t, m))
            cells.append(_cell(e) if e else "—")
        cells.append(f"{first['params'] / 1e3:.0f}k" if "params" in first else "—")
        cells.append(f"{first['flops'] / 1e6:.1f}" if "flops" in first else "—")
        cells.append(f"{sum(e['train_s'] for e in summary if e['mixer'] == m):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    steps = {t: sorted({r["steps"] for r in rows if r["task"] == t}) for t in tasks}
    notes = ["", "steps: " + ", ".join(f"{t} {'/'.join(map(str, s))}" for t, s in steps.items()) + "."]
    if len(seeds) > 1:
        notes.append(f"mean ± standard deviation (min–max) over seeds {seeds} (same data; initialisation and batches "
                     "differ).")
    for t, c in calibration(rows).items():
        state = "calibrated" if c["calibrated"] else "NOT calibrated: its rows rank nothing"
        notes.append(f"- {t}: full attention {c['global']:.3f} (needed {c['needed']}) — {state}")
    return "\n".join(lines + notes)


def plot(rows, path: Path):
    """Quality (mean over seeds, bars from min to max) against forward FLOPs per image, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    tasks = list(dict.fromkeys(e["task"] for e in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        pts = [e for e in summary if e["task"] == t and "mean" in e]
        for e in pts:
            x = e["flops"] / 1e6
            ax.errorbar(x, e["mean"], yerr=[[e["mean"] - e["min"]], [e["max"] - e["mean"]]], fmt="o", ms=4, capsize=2)
            ax.annotate(e["mixer"], (x, e["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        need = CALIBRATION.get(t)
        if need is not None:
            ax.axhline(need, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("forward MFLOPs per image")
        ax.set_ylabel(pts[0]["metric"] if pts else "")
        ax.set_title(f"{t}: {TASKS[t].description}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cases(size: str) -> list[str]:
    """The cases of a size: task, mixer and seed."""
    spec = SUITES[SIZES[size]]
    return [f"{t} — {m} — seed {seed}" for t in spec.tasks for m in spec.mixers for seed in spec.seeds]


def run_suite(size: str, out_dir: str = "bench-out", *, device=None, contenders=None, limit=None) -> dict:
    """The registry's entry: ``run_vision_quality`` of a size; ``contenders``: mixers (default: the size's)."""
    if device not in (None, "cpu"):
        raise ValueError("the quality-vision suite trains on CPU: --device does not apply")
    return run_vision_quality(SIZES[size], out_dir, mixers=contenders)


def run_vision_quality(suite: str = "vision-quick", out_dir: str = "bench-out", mixers=None, progress_bar=True) -> dict:
    """Train every mixer on every task of the suite, once per seed; write ``quality-vision.{json,md,png}``."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    spec = SUITES[suite]
    chosen = tuple(mixers) if mixers else spec.mixers
    unknown = sorted(set(chosen) - set(mixer_names()))
    if unknown:
        raise ValueError(f"mixers must be among {mixer_names()}, got unknown {unknown}")
    rows, start = [], time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(spec.budget_for(t, 0).steps for t in spec.tasks) * len(chosen) * len(spec.seeds)
    done = 0
    for tname in spec.tasks:
        task = TASKS[tname]
        size = spec.model.get("img_size", 32)
        data = (task.make(spec.train, size=size, seed=1), task.make(spec.test, size=size, seed=2))
        for mixer in chosen:
            for seed in spec.seeds:
                budget = spec.budget_for(tname, seed)

                def on_step(step, base=done, label=f"{tname} — {mixer} — seed {seed}"):
                    if progress_bar:
                        progress(base + step + 1, total, label, start)

                rows.append(_run_one(task, mixer, spec, budget, data, on_step))
                save_partial(out, "quality-vision", rows)
                done += budget.steps
    return finish_report(
        out, "quality-vision", suite, spec.budget,
        f"{spec.train} training / {spec.test} test images", rows, start,
        table=format_table, plot=plot, progress_total=total if progress_bar else None,
        budget_extra={"train_examples": spec.train, "test_examples": spec.test, "seeds": list(spec.seeds),
                      "steps_per_task": {t: spec.budget_for(t, 0).steps for t in spec.tasks}},
        model=spec.model, calibration=calibration(rows),
    )
