"""Suite ``quality-lm``: which sparse attention pattern keeps quality at equal density.

Every pattern family has one integer knob; the harness picks the knob whose density is
closest to the target (for content-selected patterns, the density of their selection on
random q and k) (relative to the task's dense pattern: ``Causal`` for causal
tasks, ``Full`` for the others) and reports the density it got. A tiny model (``foveal.models.lm``)
is trained under each pattern with one fixed budget; the report is a table
(task × pattern: accuracy or normalised MSE, density, train time), JSON and plots of
quality against density per task.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from foveal.bench import lm_tasks as T
from foveal.bench.density import allowed_pairs, solve_knob
from foveal.bench.report import save_partial
from foveal.bench.train import Budget, finish_report, fit, progress
from foveal.models.lm import AttentionOnly, EncoderDecoder, TinyLM
from foveal.patterns import BigBird, Causal, Dilated, Full, Power, Sinks, SlidingWindow, Strided
from foveal.patterns.dynamic import DHSA, BlockTopK, VerticalSlash

__all__ = ["FAMILIES", "SUITES", "SIZES", "allowed_pairs", "cases", "match_density", "run_lm_quality", "run_suite"]


# -- pattern families: name → (kind, make(n, knob) or make(n_q, n_kv, knob), knob range) --------------------------
CAUSAL = {
    "full": lambda n, k: Causal(n),
    "window": lambda n, k: SlidingWindow(n, k),
    "sinks+window": lambda n, k: Sinks(n, 4) | SlidingWindow(n, k),  # sinks are causal
    "strided+window": lambda n, k: (Strided(n, k) & Causal(n)) | SlidingWindow(n, k),
    "dilated": lambda n, k: Dilated(n, (k, 2 * k, 4 * k), (1, 2, 4)) & Causal(n),
    "power": lambda n, k: Power(n, block=k, window=1, sinks=1),
    "bigbird": lambda n, k: BigBird(n, block=k, window=3, globals=1, random=1) & Causal(n),
    # content-selected: blocks of n/16 tokens chosen from q and k at every call
    "block-topk": lambda n, k: BlockTopK(n, topk=k, block=max(8, n // 16)),
    "dhsa": lambda n, k: DHSA(n, budget=k, chunk=max(8, n // 16)),
    "vertical-slash": lambda n, k: VerticalSlash(n, vertical=k, slash=k, last_q=min(64, n), always_vertical=min(4, k),
                                                 always_slash=min(4, k), min_vertical=0, min_slash=0,
                                                 block=max(8, n // 16)),
}
NONCAUSAL = {
    "full": lambda n, k: Full(n),
    "window": lambda n, k: SlidingWindow(n, k, k),
    "strided+window": lambda n, k: Strided(n, k) | SlidingWindow(n, k, k),
    "dilated": lambda n, k: Dilated(n, (k, 2 * k, 4 * k), (1, 2, 4)),
    "bigbird": lambda n, k: BigBird(n, block=k, window=3, globals=1, random=1),
}
CROSS = {  # (n_q, n_kv, knob); windows aligned bottom-right
    "full": lambda nq, nk, k: Full(nq, n_kv=nk),
    "window": lambda nq, nk, k: SlidingWindow(nq, k, k, n_kv=nk),
    "sinks+window": lambda nq, nk, k: Sinks(nq, 4, n_kv=nk) | SlidingWindow(nq, k, k, n_kv=nk),
}
CAUSAL_CROSS = {
    "full": lambda nq, nk, k: Causal(nq, n_kv=nk),
    "window": lambda nq, nk, k: SlidingWindow(nq, k, n_kv=nk),
    "sinks+window": lambda nq, nk, k: Sinks(nq, 4, n_kv=nk) | SlidingWindow(nq, k, n_kv=nk),
}
FAMILIES = {"causal": CAUSAL, "noncausal": NONCAUSAL, "cross": CROSS, "causal-cross": CAUSAL_CROSS}


def match_density(make: Callable, dense, target: float, lo: int = 1, hi: int = 4096):
    """``(pattern, knob, density)``: the knob in ``[lo, hi]`` whose relative density is closest to ``target``.

    Relative density = allowed pairs / allowed pairs of ``dense``. Solved by ``density.solve_knob``
    without assuming monotonicity (a stride and a window in one knob: ``strided+window``).
    """
    full = allowed_pairs(dense)

    def rel(k):
        try:
            return allowed_pairs(make(k)) / full
        except ValueError:
            return None

    knob, density = solve_knob(rel, target, lo, hi, monotone=False)
    return make(knob), knob, density


# -- tasks ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMTask:
    name: str
    family: str  # a key of FAMILIES
    n: int
    metric: str  # "accuracy" or "normalised MSE"
    description: str


def _ce(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=T.IGNORE)


def _accuracy(logits, targets):
    keep = targets != T.IGNORE
    return (logits.argmax(-1)[keep] == targets[keep]).float().mean().item()


def _data(task: LMTask, count: int, seed: int, n: int | None = None):
    n = n or task.n
    return {
        "passkey": lambda: T.passkey(count, n, seed),
        "mqar": lambda: T.mqar(count, n, seed),
        "icl-regression": lambda: T.icl_regression(count, n, seed),
        "reverse": lambda: T.reverse(count, n, seed),
        "cross-reverse": lambda: T.cross_reverse(count, n, seed),
        "cross-recall": lambda: T.cross_recall(count, n, seed),
    }[task.name]()


def _model(task: LMTask, pattern_fn):
    if task.name == "icl-regression":
        return AttentionOnly(9, 4, pattern_fn)
    if task.family in ("cross", "causal-cross"):
        return EncoderDecoder(64, pattern_fn, dim=64, depth=1, heads=4)
    return TinyLM(64, pattern_fn, dim=64, depth=2, heads=4)


class _Seq2Seq(torch.nn.Module):
    """Adapter so that ``fit`` can call the encoder–decoder as ``model(src)``."""

    def __init__(self, inner, tgt_len):
        super().__init__()
        self.inner, self.tgt_len = inner, tgt_len

    def forward(self, src):
        return self.inner(src, self.tgt_len)


def _run(task: LMTask, pattern_name: str, target: float, suite, on_step) -> dict:
    family = FAMILIES[task.family]
    make = family[pattern_name]
    row = {"task": task.name, "pattern": pattern_name, "metric": task.metric, "target_density": target}
    cross = task.family in ("cross", "causal-cross")
    tgt_len = 16 if task.name == "cross-recall" else task.n
    if cross:
        dense = family["full"](tgt_len, task.n, 0)
        pattern, knob, density = match_density(lambda k: make(tgt_len, task.n, k), dense, target, hi=task.n)
        pattern_fn = lambda nq, nk, _k=knob: make(nq, nk, _k)  # noqa: E731
    else:
        dense = family["full"](task.n, 0)
        pattern, knob, density = match_density(lambda k: make(task.n, k), dense, target, hi=task.n)
        pattern_fn = lambda n, _k=knob: make(n, _k)  # noqa: E731
    if pattern_name == "full":
        density = 1.0
    row.update(knob=knob, density=density, repr=repr(pattern)[:120])
    torch.manual_seed(suite.budget.seed)
    model = _model(task, pattern_fn)
    if cross:
        model = _Seq2Seq(model, tgt_len)
    xtr, ytr = _data(task, suite.train, seed=1)
    xte, yte = _data(task, suite.test, seed=2)
    if task.name == "icl-regression":
        loss = torch.nn.functional.mse_loss
    else:
        loss = _ce
    row["train_s"] = fit(model, xtr, ytr, loss, suite.budget, on_step)
    with torch.no_grad():
        if task.name == "icl-regression":
            row["value"] = _icl_scores(model, xte, yte, row, task)
        else:
            row["value"] = _accuracy(model(xte), yte)
    row["status"] = "ok"
    return row


def _icl_scores(model, xte, yte, row, task):
    """Normalised MSE (MSE / Var(y)) at the training length, and at twice it; ridge and 1-step GD alongside."""
    var = yte.var().item()
    row["nmse"] = torch.nn.functional.mse_loss(model(xte), yte).item() / var
    long_x, long_y = T.icl_regression(xte.shape[0], 2 * task.n, seed=3)
    row["nmse_2L"] = torch.nn.functional.mse_loss(model(long_x), long_y).item() / long_y.var().item()
    ridge, gd = T.ridge_and_gd(xte)
    row["ridge_nmse"] = torch.nn.functional.mse_loss(ridge, yte).item() / var
    row["gd_nmse"] = torch.nn.functional.mse_loss(gd, yte).item() / var
    return row["nmse"]


# -- suites ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMSuite:
    tasks: tuple[LMTask, ...]
    patterns: dict  # family → tuple of pattern names
    densities: tuple[float, ...]
    train: int
    test: int
    budget: Budget


def _tasks(n):
    """The default tasks: each is learnt by full attention within the suite's budget (BENCHMARKS.md)."""
    return (
        LMTask("passkey", "causal", n, "accuracy", "recall the marked passkey at the end (causal self)"),
        LMTask("icl-regression", "causal", 32, "normalised MSE", "in-context linear regression, 1 layer"),
        LMTask("cross-reverse", "cross", n // 2, "accuracy", "decoder outputs the source reversed (non-causal cross)"),
        LMTask("cross-recall", "causal-cross", n // 2, "accuracy", "decoder recalls visible pairs in order (causal cross)"),
    )


def _hard_tasks(n):
    """Tasks full attention did not learn in 150 steps of the ``lm`` suite (MQAR 0.03, reverse 0.09: chance), so
    their rows said nothing about the patterns; they left the default suites for ``lm-hard``."""
    return (
        LMTask("mqar", "causal", n, "accuracy", "multi-query associative recall (causal self)"),
        LMTask("reverse", "noncausal", n // 2, "accuracy", "output the sequence reversed (non-causal self)"),
    )


SUITES = {
    # a check of the whole pipeline in a few minutes: too few steps for the models to learn much
    "lm-quick": LMSuite(_tasks(48), {f: tuple(p) for f, p in FAMILIES.items()}, (0.25,), 256, 64,
                        Budget(steps=20, batch=16, lr=3e-3)),
    "lm": LMSuite(_tasks(96), {f: tuple(p) for f, p in FAMILIES.items()}, (0.15, 0.35), 4800, 256,
                  Budget(steps=150, batch=32, lr=3e-3)),
    # not calibrated: shorter sequences and four times the steps, for finding the budget MQAR and reverse need
    "lm-hard": LMSuite(_hard_tasks(48), {f: tuple(p) for f, p in FAMILIES.items()}, (0.35,), 9600, 256,
                       Budget(steps=600, batch=32, lr=3e-3)),
    # one step of every task with full attention and a window: a check that the pipeline runs
    "lm-dry": LMSuite(_tasks(64), {f: ("full", "window") for f in FAMILIES}, (0.25,), 16, 8, Budget(steps=1, batch=4)),
}
#: registry sizes (``foveal bench run quality-lm --size S``) → ``SUITES``
SIZES = {"dry": "lm-dry", "quick": "lm-quick", "full": "lm", "hard": "lm-hard"}


def format_table(rows) -> str:
    lines = ["| task | pattern | target density | density | knob | value | metric | train s |", "|" + "---|" * 8]
    for r in rows:
        value = f"{r['value']:.3f}" if r.get("status") == "ok" else r.get("status", "")[:40]
        lines.append(
            f"| {r['task']} | {r['pattern']} | {r['target_density']:.2f} | {r.get('density', float('nan')):.3f} | "
            f"{r.get('knob', '')} | {value} | {r['metric']} | {r.get('train_s', 0):.0f} |"
        )
    return "\n".join(lines)


def plot(rows, path: Path):
    """Quality against density per task, one line per pattern."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(tasks) / cols), cols, figsize=(15, 4 * math.ceil(len(tasks) / cols)),
                             squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        mine = [r for r in rows if r["task"] == t and r.get("status") == "ok"]
        for name in dict.fromkeys(r["pattern"] for r in mine):
            pts = sorted((r["density"], r["value"]) for r in mine if r["pattern"] == name)
            ax.plot(*zip(*pts), marker="o", linestyle="-" if len(pts) > 1 else "", label=name)
        ax.set_xlabel("density (relative to the dense pattern)")
        ax.set_ylabel(mine[0]["metric"] if mine else "")
        ax.set_title(t)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jobs(spec: LMSuite) -> list[tuple]:
    """(task, pattern name, target density) of every model a suite trains."""
    return [(task, name, target) for task in spec.tasks for name in spec.patterns[task.family]
            for target in ((1.0,) if name == "full" else spec.densities)]


def cases(size: str) -> list[str]:
    """The cases of a size: task, pattern and target density."""
    return [f"{task.name} — {name} @ {target:.2f}" for task, name, target in _jobs(SUITES[SIZES[size]])]


def run_suite(size: str, out_dir: str = "bench-out", *, device=None, contenders=None, limit=None) -> dict:
    """The registry's entry: ``run_lm_quality`` of a size (CPU, every pattern family of the size)."""
    if device not in (None, "cpu") or contenders is not None:
        raise ValueError("the quality-lm suite trains on CPU with its own patterns: "
                         "--device and --contenders do not apply")
    return run_lm_quality(SIZES[size], out_dir)


def run_lm_quality(suite: str = "lm-quick", out_dir: str = "bench-out", progress_bar: bool = True) -> dict:
    """Train every pattern on every task of the suite; write ``quality-lm.{json,md,png}`` into ``out_dir``."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    spec = SUITES[suite]
    jobs = _jobs(spec)
    rows, start = [], time.perf_counter()
    total = len(jobs) * spec.budget.steps
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for j, (task, name, target) in enumerate(jobs):
        def on_step(step, base=j * spec.budget.steps, label=f"{task.name} — {name} @ {target:.2f}"):
            if progress_bar:
                progress(base + step + 1, total, label, start)

        try:
            rows.append(_run(task, name, target, spec, on_step))
        except (ValueError, FloatingPointError) as e:
            rows.append({"task": task.name, "pattern": name, "metric": task.metric, "target_density": target,
                         "status": f"failed: {e}"})
        save_partial(out, "quality-lm", rows)
    return finish_report(
        out, "quality-lm", suite, spec.budget,
        f"{spec.train} training / {spec.test} test sequences per task", rows, start,
        table=format_table, plot=plot, progress_total=total if progress_bar else None,
        budget_extra={"train_examples": spec.train, "test_examples": spec.test},
    )

