"""Learning curves of one mixer on one vision task: the calibration runs behind ``foveal bench quality --suite vision``.

``PYTHONPATH=src python benchmarks/vision_calibration.py TASK SIZE STEPS TRAIN SEED [MIXER] [LR] [--scale S]``

Trains the quality suite's tiny backbone (stages of 24/48/64 channels, one block each, ``SIZE``² images) with
``MIXER`` (default ``global``, full attention) on ``TRAIN`` generated examples of ``TASK`` for ``STEPS`` steps of
32 (AdamW at ``LR``, warm-up then cosine, one thread), and prints the accuracy (mIoU for ``cue-seg``) on 500 of
its training examples and on 500 held-out ones at five points of the run. ``--scale`` is ``match``'s glyph scale.
A task whose full-attention curve stays at chance, on the training examples too, cannot rank mixers in this
budget (BENCHMARKS.md lists the runs).
"""

from __future__ import annotations

import argparse
import time

import torch

from foveal.bench.quality_vision import _build, evaluate
from foveal.bench.train import Budget, fit
from foveal.bench.vision_tasks import TASKS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("size", type=int)
    ap.add_argument("steps", type=int)
    ap.add_argument("train", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("mixer", nargs="?", default="global")
    ap.add_argument("lr", nargs="?", type=float, default=3e-3)
    ap.add_argument("--scale", type=int, default=None)
    a = ap.parse_args()
    task = TASKS[a.task]
    kw = {} if a.scale is None else {"scale": a.scale}
    xtr, ytr = task.make(a.train, size=a.size, seed=1, **kw)
    xte, yte = task.make(500, size=a.size, seed=2, **kw)
    torch.manual_seed(a.seed)
    model = _build(task, a.mixer, dict(img_size=a.size, dims=(24, 48, 64), depths=(1, 1, 1), heads=(2, 2, 4)))
    curve = []

    def on_step(step):
        if (step + 1) % max(1, a.steps // 5) == 0:
            curve.append((step + 1, round(evaluate(model, task, xtr[:500], ytr[:500]), 3),
                          round(evaluate(model, task, xte, yte), 3)))
            model.train()

    start = time.time()
    fit(model, xtr, ytr, torch.nn.functional.cross_entropy, Budget(steps=a.steps, batch=32, lr=a.lr, seed=a.seed),
        on_step)
    print(f"{a.task} {a.size}² {kw or ''} {a.mixer} lr {a.lr}, {a.train} examples, seed {a.seed}: "
          f"{time.time() - start:.0f} s; (step, train, held-out): {curve}")


if __name__ == "__main__":
    main()
