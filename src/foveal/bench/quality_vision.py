"""``foveal bench quality --suite vision``: which token mixer learns local + long-range tasks best.

The tiny backbone (``foveal.models``) is trained with each mixer under one fixed budget
on the synthetic tasks of ``vision_tasks``; the report gives accuracy (mIoU for the
dense task), parameters, forward FLOPs per image and training time per mixer, as a
table, JSON and a plot of quality against FLOPs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from foveal.bench.train import Budget, finish_report, fit, progress, save_partial
from foveal.bench.vision_tasks import TASKS
from foveal.models import Classifier, Segmenter, mixer_names

__all__ = ["SUITES", "run_vision_quality", "evaluate", "flops_per_image"]


@dataclass(frozen=True)
class Suite:
    tasks: tuple[str, ...]
    mixers: tuple[str, ...]
    train: int
    test: int
    budget: Budget
    model: dict = field(default_factory=dict)


_SMALL = dict(img_size=32, dims=(24, 48, 64), depths=(1, 1, 1), heads=(2, 2, 4))
SUITES = {
    # a check of the whole pipeline in a few minutes: too few steps for the models to learn much
    "vision-quick": Suite(tuple(TASKS), tuple(mixer_names()), 256, 64, Budget(steps=20, batch=16),
                          dict(img_size=16, dims=(16, 32), depths=(1, 1), heads=(2, 2))),
    "vision": Suite(tuple(TASKS), tuple(mixer_names()), 4000, 500, Budget(steps=250, batch=32, lr=3e-3), _SMALL),
}


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


def _run_one(task, mixer, suite, data, on_step) -> dict:
    row = {"task": task.name, "mixer": mixer, "metric": "accuracy" if task.kind == "classify" else "mIoU"}
    try:
        torch.manual_seed(suite.budget.seed)
        model = _build(task, mixer, suite.model)
    except (ImportError, AttributeError) as e:
        return {**row, "status": f"unavailable: {e}"}
    (xtr, ytr), (xte, yte) = data
    loss = torch.nn.functional.cross_entropy
    row["params"] = sum(p.numel() for p in model.parameters())
    row["flops"] = flops_per_image(model, xte)
    try:
        row["train_s"] = fit(model, xtr, ytr, loss, suite.budget, on_step)
    except FloatingPointError as e:
        return {**row, "status": f"diverged: {e}"}
    row["value"] = evaluate(model, task, xte, yte)
    row["status"] = "ok"
    return row


def format_table(rows) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    by = {(r["task"], r["mixer"]): r for r in rows}
    metric = {t: next(r["metric"] for r in rows if r["task"] == t) for t in tasks}
    head = ["mixer"] + [f"{t} ({metric[t]})" for t in tasks] + ["params", "MFLOPs/img", "train s (sum)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in mixers:
        cells, first = [m], next(r for r in rows if r["mixer"] == m)
        for t in tasks:
            r = by.get((t, m))
            cells.append(f"{r['value']:.3f}" if r and r.get("status") == "ok" else (r or {}).get("status", "—")[:40])
        cells.append(f"{first['params'] / 1e3:.0f}k" if "params" in first else "—")
        cells.append(f"{first['flops'] / 1e6:.1f}" if "flops" in first else "—")
        cells.append(f"{sum(r.get('train_s', 0) for r in rows if r['mixer'] == m):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path: Path):
    """Quality against forward FLOPs per image, one panel per task, one labelled point per mixer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        pts = [r for r in rows if r["task"] == t and r.get("status") == "ok"]
        for r in pts:
            ax.scatter(r["flops"] / 1e6, r["value"], s=25)
            ax.annotate(r["mixer"], (r["flops"] / 1e6, r["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("forward MFLOPs per image")
        ax.set_ylabel(pts[0]["metric"] if pts else "")
        ax.set_title(f"{t}: {TASKS[t].description}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_vision_quality(suite: str = "vision-quick", out_dir: str = "bench-out", mixers=None, progress_bar=True) -> dict:
    """Train every mixer on every task of the suite; write ``quality-vision.{json,md,png}`` into ``out_dir``."""
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
    total = len(spec.tasks) * len(chosen) * spec.budget.steps
    done = 0
    for tname in spec.tasks:
        task = TASKS[tname]
        size = spec.model.get("img_size", 32)
        data = (task.make(spec.train, size=size, seed=1), task.make(spec.test, size=size, seed=2))
        for mixer in chosen:
            def on_step(step, base=done, label=f"{tname} — {mixer}"):
                if progress_bar:
                    progress(base + step + 1, total, label, start)

            rows.append(_run_one(task, mixer, spec, data, on_step))
            save_partial(out, "quality-vision", rows)
            done += spec.budget.steps
    return finish_report(
        out, "quality-vision", suite, spec.budget,
        f"{spec.train} training / {spec.test} test images", rows, start,
        table=format_table, plot=plot, progress_total=total if progress_bar else None,
        budget_extra={"train_examples": spec.train, "test_examples": spec.test},
        model=spec.model,
    )

