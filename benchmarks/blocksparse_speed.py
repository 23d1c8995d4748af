"""Content-selected attention on the ``blocksparse`` backend, timed against dense causal SDPA.

One process, every contender on the same tensors (batch 1, 8 query heads, 2 key heads,
head_dim 64, float32, ``torch.manual_seed(0)`` normal), warm, median of ``--repeats``
runs. The baseline is ``scaled_dot_product_attention(q, k.repeat_interleave(4, 1),
v.repeat_interleave(4, 1), is_causal=True)``; every other time is printed as a ratio to
it. For each selector: ``attend(q, k, v, pattern)`` (selection included), ``attend(q, k,
v, sel)`` on a selection made beforehand, and the selection's own cost
(``pattern.select(q, k)``, no gradients) in its own column; ``density`` is
``sel.density()`` averaged over heads. ``fwd+bwd`` backpropagates a fixed random output
gradient to q, k and v.

    PYTHONPATH=src python benchmarks/blocksparse_speed.py --n 4096 16384 --repeats 3

The machine is shared: report the load (``uptime``) with the numbers and repeat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from foveal import attend
from foveal.patterns.dynamic import DHSA, BlockTopK, VerticalSlash

SELECTORS = {
    "vertical-slash": lambda n: VerticalSlash(n, vertical=n // 32, slash=n // 16),
    "block-topk": lambda n: BlockTopK(n, 8),
    "dhsa": lambda n: DHSA(n, budget=512),
}


def _time(fn, repeats):
    fn()  # warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _runner(fn, q, k, v, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v)
        return run
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], generator=torch.Generator().manual_seed(1))

    def run():
        for t in (qg, kg, vg):
            t.grad = None
        fn(qg, kg, vg).backward(g)

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--only", nargs="+", default=list(SELECTORS), choices=list(SELECTORS))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    print("| n | mode | contender | density | time (s) | x SDPA | select (s) | select x SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.n:
        torch.manual_seed(0)
        q, k, v = torch.randn(1, 8, n, 64), torch.randn(1, 2, n, 64), torch.randn(1, 2, n, 64)
        g = q.shape[1] // k.shape[1]

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                  is_causal=True)

        for mode in args.modes:
            base = _time(_runner(sdpa, q, k, v, mode), args.repeats)
            print(f"| {n} | {mode} | torch sdpa causal | 0.5 | {base:.3f} | 1.00 | | |", flush=True)
            for name in args.only:
                pattern = SELECTORS[name](n)
                sel = pattern.select(q, k)
                density = float(sel.density().mean())
                t_sel = _time(lambda: pattern.select(q, k), args.repeats)
                t_all = _time(_runner(lambda a, b, c: attend(a, b, c, pattern, backend="blocksparse"), q, k, v, mode),
                              args.repeats)
                t_on = _time(_runner(lambda a, b, c: attend(a, b, c, sel, backend="blocksparse"), q, k, v, mode),
                             args.repeats)
                print(f"| {n} | {mode} | {name} | {density:.3f} | {t_all:.3f} | {t_all / base:.2f} | {t_sel:.3f} | "
                      f"{t_sel / base:.2f} |", flush=True)
                print(f"| {n} | {mode} | {name} on a selection | {density:.3f} | {t_on:.3f} | {t_on / base:.2f} | | |",
                      flush=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
