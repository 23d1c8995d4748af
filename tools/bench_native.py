"""Native block-sparse kernel against the eager backends and SDPA, in one process, interleaved rounds.

    PYTHONPATH=src python tools/bench_native.py [--threads N] [--cases window,topk,vslash,na] [--rounds R]

Cases (issue 20's targets, 4 heads, head_dim 64, float32, batch 1 unless said): causal
sliding window of 512 keys at 16k tokens; BlockTopK at 16k (topk 8: density ~0.03) and
VerticalSlash at 16k, both selection included; 7x7 neighbourhood on 64x64; and, for the
``auto`` rule against the sdpa backend, Causal at 16k and NA 7x7 on 14x14 (batch 8, the
small-pattern masked path). Each case is timed forward and forward+backward; contenders
are ``attend(..., backend=...)`` for native, cpu (static patterns) and blocksparse, and
SDPA (``scaled_dot_product_attention`` with is_causal for the 1-D cases, unmasked for the
64x64 neighbourhood; the sdpa backend for the last two), all on the same tensors, every
contender in every round (blocksparse is left out of the 16k static cases, where ``auto``
picks cpu and it took 53x native's forward time in a trial run) (``foveal.bench.timing.time_interleaved(together=True)``),
medians. Prints a Markdown table with each contender's time over native's, and the
machine's load.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from foveal import attend
from foveal.bench.timing import load, time_interleaved
from foveal.patterns.dynamic import BlockTopK, VerticalSlash
from foveal.patterns.global_ import Causal
from foveal.patterns.local import Neighborhood, SlidingWindow

#: name: (title, batch, tokens, pattern, sdpa contender: "causal" (is_causal), "dense" (no mask) or "backend"
#: (attend's sdpa backend: the small-pattern masked path or Causal), static pattern (the cpu backend runs it))
CASES = {
    "window": ("causal window 512, 16k", 1, 16384, lambda n: SlidingWindow(n, left=511), "causal", True),
    "topk": ("BlockTopK 16k, topk 8 (incl. selection)", 1, 16384, lambda n: BlockTopK(n, topk=8), "causal", False),
    "vslash": ("VerticalSlash 16k, 64 columns, 512 diagonals (incl. selection)", 1, 16384,
               lambda n: VerticalSlash(n, vertical=64, slash=512), "causal", False),
    "na": ("NA 7x7 on 64x64", 1, 4096, lambda n: Neighborhood((64, 64), 7), "dense", True),
    "causal": ("Causal 16k", 1, 16384, lambda n: Causal(n), "backend", True),
    "na14": ("NA 7x7 on 14x14, batch 8", 8, 196, lambda n: Neighborhood((14, 14), 7), "backend", True),
}


def contenders(q, k, v, pattern, sdpa_kind, static, backward):
    def run_backend(name):
        def f():
            out = attend(q, k, v, pattern, backend=name)
            if backward:
                out.sum().backward()
        return f

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=sdpa_kind == "causal")
        if backward:
            out.sum().backward()

    fns = {"native": run_backend("native")}
    if not static or q.shape[2] <= 4096:  # at 16k the eager blocksparse kernel takes 20-50x native's time
        fns["blocksparse"] = run_backend("blocksparse")
    if static:
        fns["cpu"] = run_backend("cpu")
    fns["sdpa"] = run_backend("sdpa") if sdpa_kind == "backend" else sdpa
    return fns


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cases", default=",".join(CASES))  # e.g. --cases window,na
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, load before {load()}")
    print("| case | pass | native s | " + " | ".join(f"{c} / native" for c in ("blocksparse", "cpu", "sdpa")) + " |")
    print("|---|---|---|---|---|---|")
    for key in args.cases.split(","):
        title, batch, n, make, sdpa_kind, static = CASES[key]
        pattern = make(n)
        for backward in (False, True):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(batch, 4, n, 64, generator=g).requires_grad_(backward) for _ in range(3))
            fns = contenders(q, k, v, pattern, sdpa_kind, static, backward)
            r = time_interleaved(fns, None, min_runs=args.rounds, max_runs=args.rounds, min_seconds=0.0,
                                 memory=False, together=True, keep=False)
            base = r["native"]["median_s"]
            cells = [f"{r[c]['median_s'] / base:.2f}x" if c in r else "—" for c in ("blocksparse", "cpu", "sdpa")]
            print(f"| {title} | {'fwd+bwd' if backward else 'fwd'} | {base:.3f} | " + " | ".join(cells) + " |",
                  flush=True)
    print(f"load after {load()}")


if __name__ == "__main__":
    main()
