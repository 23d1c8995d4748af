"""Context-parallel attention on several processes: ``torchrun --nproc_per_node 2 -m foveal.examples.context_parallel``.

Every rank builds the same random q, k, v for a long sequence (StreamingLLM's sinks +
causal sliding window over 8192 tokens) and for a 2-D image grid (a 7×7
neighbourhood on 64×64 tokens), and for every method builds one ``ContextParallel``
plan, keeps its shard (``plan.shard``), attends (``plan.attend``) and gathers the
result (``plan.unshard``), all under the plan's one token order; rank 0 checks the gathered result and gradients against single-process
``attend`` and prints what each rank sent and which ring steps it skipped. Runs on
CPU with gloo (CUDA with NCCL when available).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from foveal.distributed import ContextParallel, CPStats, init
from foveal.functional import attend
from foveal.patterns import Neighborhood, Sinks, SlidingWindow


def _cases(quick: bool):
    n = 2048 if quick else 8192
    side = 32 if quick else 64
    return [
        ("sinks + causal window 256", Sinks(n, 4) | SlidingWindow(n, 256), "contiguous"),
        ("causal window 256, zigzag", SlidingWindow(n, 256), "zigzag"),
        (f"7x7 neighbourhood on {side}x{side}", Neighborhood((side, side), 7), "contiguous"),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sequences")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a silent peer is an error")
    args = parser.parse_args(argv)
    group = init(timeout=args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    heads = 2 * world
    methods = ["ring", "allgather", "ulysses"] + (["hybrid"] if world % 2 == 0 and world > 2 else [])
    for name, pattern, order in _cases(args.quick):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, pattern.n_q, 64, generator=gen).to(device) for _ in range(3))
        ref = grads = None
        if rank == 0:
            qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
            t0 = time.perf_counter()
            ref = attend(qr, kr, vr, pattern)
            ref.square().sum().backward()
            single = time.perf_counter() - t0
            grads = (qr.grad, kr.grad, vr.grad)
        for method in methods:
            cp = ContextParallel(pattern, group, order=order, method=method,
                                 ulysses_degree=2 if method == "hybrid" else None)
            ql, kl, vl = (cp.shard(t).requires_grad_() for t in (q, k, v))
            stats = CPStats()
            dist.barrier()
            t0 = time.perf_counter()
            out = cp.attend(ql, kl, vl, stats=stats)
            out.square().sum().backward()
            elapsed = time.perf_counter() - t0
            full = cp.unshard(out.detach())
            full_grads = [cp.unshard(t.grad) for t in (ql, kl, vl)]
            report = torch.tensor([stats.total_sent, stats.steps_skipped, stats.steps, elapsed], dtype=torch.float64)
            reports = [torch.zeros_like(report) for _ in range(world)]
            dist.all_gather(reports, report)
            if rank == 0:
                err = max(
                    float((full - ref.detach()).abs().max()),
                    *(float((a - b).abs().max()) for a, b in zip(full_grads, grads)),
                )
                sent = ", ".join(f"{int(r[0]) / 1e6:.2f}" for r in reports)
                skipped = ", ".join(f"{int(r[1])}/{int(r[2])}" for r in reports)
                slowest = max(float(r[3]) for r in reports)
                print(
                    f"{name:34s} {method:9s} order={order:10s} max|diff|={err:.1e}  "
                    f"time fwd+bwd {slowest:.3f} s (1 process: {single:.3f} s)  "
                    f"MB sent per rank [{sent}]  ring steps skipped [{skipped}]",
                    flush=True,
                )
                assert err < 1e-3, f"{method} differs from single-process attend by {err}"
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
