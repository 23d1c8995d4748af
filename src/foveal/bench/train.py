"""A fixed-budget training loop shared by the quality benchmarks.

Every contender gets the same data, the same number of steps, the same batch size
and the same optimiser (AdamW, linear warm-up then cosine decay); only the model
differs. Seeds are fixed, so a repeated run gives the same numbers on one machine.
"""

from __future__ import annotations

import contextlib
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from foveal.bench.measure import progress
from foveal.bench.report import write_report

__all__ = ["Budget", "fit", "progress", "threads", "finish_report"]


@dataclass(frozen=True)
class Budget:
    steps: int
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.1
    seed: int = 0
    #: intra-op threads while training (see ``threads``)
    threads: int = 1


def _schedule(step: int, budget: Budget) -> float:
    warm = max(1, int(budget.warmup * budget.steps))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, budget.steps - warm)
    return 0.5 * (1 + math.cos(math.pi * t))


def fit(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn, budget: Budget, on_step=None):
    """Train ``model`` on ``(inputs, targets)`` for ``budget.steps`` minibatch steps; returns seconds taken.

    Minibatches are drawn with replacement from a generator seeded by ``budget.seed``.
    ``on_step(step)`` is called after every step (for progress bars).
    """
    with threads(budget.threads):
        return _fit(model, inputs, targets, loss_fn, budget, on_step)


def _fit(model, inputs, targets, loss_fn, budget, on_step):
    torch.manual_seed(budget.seed)
    gen = torch.Generator().manual_seed(budget.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=budget.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, budget))
    model.train()
    start = time.perf_counter()
    for step in range(budget.steps):
        idx = torch.randint(0, inputs.shape[0], (budget.batch,), generator=gen)
        loss = loss_fn(model(inputs[idx]), targets[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {step}: loss {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step)
    model.eval()
    return time.perf_counter() - start


@contextlib.contextmanager
def threads(count: int):
    """Run the block with ``count`` intra-op threads, then restore the previous number.

    The quality benchmarks default to 1: their models are tiny, and on a shared machine
    one thread per process avoids stalls waiting for a descheduled worker thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finish_report(out: Path, name: str, suite: str, budget: Budget, data: str, rows: list, start: float, *,
                  table, plot, progress_total: int | None = None, **extra) -> dict:
    """Close a quality run: hand its result, ``table(rows)`` and ``plot(rows, path)`` to ``report.write_report``
    (``name.json``, ``name.md``, ``name.png`` in ``out``) and return the result.

    ``data`` says what was trained on (for the header); ``extra`` goes into the JSON, with
    ``budget_extra`` merged into its ``budget``; ``progress_total`` completes the progress bar.
    """
    if progress_total is not None:
        progress(progress_total, progress_total, "done", start)
        sys.stderr.write("\n")
    result = {
        "suite": suite,
        "machine": f"{platform.machine()}, {budget.threads} thread(s), torch {torch.__version__}",
        "budget": {**budget.__dict__, **extra.pop("budget_extra", {})},
        **extra,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    text = (f"suite `{suite}` ({result['machine']}), {budget.steps} steps × batch {budget.batch}, "
            f"{data}, {result['seconds']:.0f} s in all\n\n{table(rows)}\n")
    return write_report(out, name, result, text, lambda path: plot(rows, path))
