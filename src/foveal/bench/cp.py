"""Suite ``cp`` (``foveal bench run cp``): context parallelism, measured on CPU processes and simulated at scale.

Measured: ``ContextParallel.attend`` by every method on 2–4 gloo processes of this machine, forward
and forward+backward, timed warm (median; the slowest rank counts) against
single-process ``attend`` on the same tensors in the same run, with the bytes each
rank sent. Every process and the baseline use one thread, so with P free cores the
ideal ratio is 1/P.

Simulated, from the block layouts alone (no tensors): for P = 2 … 1024 ranks and
sequences up to 4M tokens, per order, the per-rank attended blocks (load max / mean),
the bytes each rank sends per method (foveal's sparsity-aware ring and all-gather
against their dense forms, Ulysses, hybrid), the ring steps skipped, and a predicted
forward time per attention layer under the model in ``MODEL`` (stated in the report).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from foveal.bench.report import write_report

__all__ = ["run", "run_suite", "cases", "simulate", "MODEL", "SIZES"]

#: the result's name: measured on CPU processes only
NAME = "cp-cpu"

#: the cost model of the simulation (every figure is an assumption, stated in the report)
MODEL = {
    "layer": "batch 1, 32 query heads, 8 key/value heads, head_dim 128, bf16 (a Llama-3-8B attention layer)",
    "batch": 1,
    "heads": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "bytes_per_element": 2,
    "flops_per_s": 500e12,  # H100 SXM bf16 dense peak 989 TFLOP/s; ~50% for attention kernels
    "nvlink_bytes_per_s": 450e9,  # NVLink 4: 900 GB/s per GPU in both directions together
    "ib_bytes_per_s": 50e9,  # InfiniBand NDR 400 Gb/s per GPU
    "gpus_per_node": 8,
    "latency_s": 10e-6,  # per message
    "work": "4·head_dim FLOPs per (query, key) pair per head, counted over the non-empty blocks of the layout",
    "ring": "steps in lockstep; each step takes max over ranks of max(compute, transfer of the next shard)",
    "allgather": "gather first (the largest receive of any rank), then compute (the largest load)",
    "ulysses": "two all-to-alls of q, k, v and the output, then the whole sequence for heads/P heads",
    "hybrid": "Ulysses within a node (8 ranks, NVLink), ring across nodes (InfiniBand)",
}


def _bandwidth(p: int) -> float:
    return MODEL["nvlink_bytes_per_s"] if p <= MODEL["gpus_per_node"] else MODEL["ib_bytes_per_s"]


def _sim_patterns(n: int):
    from foveal.patterns import Causal, Document, Neighborhood, Sinks, SlidingWindow

    side = int(math.isqrt(n))
    gen = torch.Generator().manual_seed(0)
    lengths, left = [], n
    while left > 0:  # packed documents of 1/64 .. 1/4 of the sequence
        length = min(left, int(torch.randint(n // 64, n // 4, (1,), generator=gen)))
        lengths.append(length)
        left -= length
    out = [
        ("causal", Causal(n)),
        ("causal window 4096", SlidingWindow(n, 4096)),
        ("sinks 4 + window 4096", Sinks(n, 4) | SlidingWindow(n, 4096)),
        ("causal documents", Document(lengths, Causal)),
    ]
    if side * side == n:
        out.append((f"2-D neighbourhood 13x13 on {side}x{side}", Neighborhood((side, side), 13)))
    return out


def _sim_order(name, n, p):
    from foveal.distributed.orders import Order

    if name != "balanced":
        return Order(name)
    per = 8
    while per > 1 and (n % (p * per) or p * per > 2048):
        per //= 2
    return Order("balanced", n // (p * per))


def simulate(n: int, p: int, pattern, order) -> list[dict]:
    """Rows for every method: load balance, bytes sent per rank, skipped steps, predicted time (seconds)."""
    from foveal.distributed.plan import cp_layout, ring_hops

    m = MODEL
    lay = cp_layout(pattern, p, order, max_blocks=1024)
    block, load = lay.block, lay.load.to(torch.float64)  # (P, P) attended block pairs
    per_rank = load.sum(1)
    n_local = n // p
    flop_per_block = 4 * m["head_dim"] * m["heads"] * m["batch"] * block * block
    compute = load * flop_per_block / m["flops_per_s"]  # seconds, queries of r × keys of s
    kv_row = m["batch"] * m["kv_heads"] * 2 * m["head_dim"] * m["bytes_per_element"]
    shard_bytes = n_local * kv_row
    bw, lat = _bandwidth(p), m["latency_s"]
    base = {
        "pattern": None,
        "n": n,
        "P": p,
        "order": order.name,
        "block": block,
        "load_max_over_mean": float(per_rank.max() / per_rank.mean()) if per_rank.sum() else 1.0,
        "blocks_max": int(per_rank.max()),
    }
    rows = []
    # ring: foveal (skip empty steps, shards travel only as far as needed) and dense
    hops = ring_hops(lay.need)
    r = torch.arange(p)[:, None]
    t = torch.arange(1, p)[None, :]
    sends = t <= hops[(r - t + 1) % p]  # (P, P-1): rank r sends at step t
    steps = int(hops.max()) + 1
    c_step = torch.stack([compute[torch.arange(p), (torch.arange(p) - s) % p] for s in range(p)], 1)  # (P, t)
    x_step = torch.zeros(p, p, dtype=torch.float64)
    x_step[:, :-1] = sends.to(torch.float64) * (shard_bytes / bw + lat)
    ring_time = float(torch.maximum(c_step, x_step)[:, :steps].amax(0).sum())
    dense_x = torch.zeros(p, p, dtype=torch.float64)
    dense_x[:, :-1] = shard_bytes / bw + lat
    dense_ring_time = float(torch.maximum(c_step, dense_x).amax(0).sum())
    skipped = int((~lay.need).sum(1).max())
    rows.append(dict(base, method="ring", bytes_max=float(sends.sum(1).max()) * shard_bytes,
                     dense_bytes_max=float((p - 1) * shard_bytes), steps_skipped_max=skipped,
                     time_s=ring_time, dense_time_s=dense_ring_time))
    # sparse all-gather
    counts = lay.needed_block_counts().to(torch.float64)
    counts.fill_diagonal_(0)
    recv = counts.sum(1) * block * kv_row
    sent = counts.sum(0) * block * kv_row
    total_compute = compute.sum(1)
    ag_time = float(recv.max() / bw + lat * (p - 1) + total_compute.max())
    rows.append(dict(base, method="allgather", bytes_max=float(sent.max()), dense_bytes_max=float((p - 1) * shard_bytes),
                     steps_skipped_max=0, time_s=ag_time,
                     dense_time_s=float((p - 1) * shard_bytes / bw + lat * (p - 1) + total_compute.max())))
    # Ulysses: heads split P ways, the whole sequence's work spread evenly
    h, hkv = m["heads"], m["kv_heads"]
    if h % p == 0:
        kvh = hkv if hkv % p == 0 else h
        elems = n_local * m["batch"] * m["head_dim"] * (2 * h + 2 * kvh)  # q, out, k, v
        a2a = (p - 1) / p * elems * m["bytes_per_element"]
        u_time = a2a / bw + 2 * lat * (p - 1) + float(compute.sum()) / p
        rows.append(dict(base, method="ulysses", bytes_max=a2a, dense_bytes_max=a2a, steps_skipped_max=0,
                         time_s=u_time, dense_time_s=u_time))
    # hybrid: Ulysses within a node, ring across nodes
    u = min(m["gpus_per_node"], p)
    if p > u and h % u == 0:
        rdeg = p // u
        kvh = hkv if hkv % u == 0 else h
        elems = n_local * m["batch"] * m["head_dim"] * (2 * h + 2 * kvh)
        a2a = (u - 1) / u * elems * m["bytes_per_element"]
        gneed = lay.need.view(rdeg, u, rdeg, u).any(3).any(1)
        gcomp = compute.view(rdeg, u, rdeg, u).sum((1, 3)) / u  # per rank of a group: its heads' share
        ghops = ring_hops(gneed)
        rr = torch.arange(rdeg)[:, None]
        tt = torch.arange(1, rdeg)[None, :]
        gsends = tt <= ghops[(rr - tt + 1) % rdeg]
        ring_shard = u * n_local * m["batch"] * (kvh // u) * 2 * m["head_dim"] * m["bytes_per_element"]
        c = torch.stack([gcomp[torch.arange(rdeg), (torch.arange(rdeg) - s) % rdeg] for s in range(rdeg)], 1)
        x = torch.zeros(rdeg, rdeg, dtype=torch.float64)
        x[:, :-1] = gsends.to(torch.float64) * (ring_shard / m["ib_bytes_per_s"] + lat)
        gsteps = int(ghops.max()) + 1
        hy_time = a2a / m["nvlink_bytes_per_s"] + 2 * lat * (u - 1) + float(torch.maximum(c, x)[:, :gsteps].amax(0).sum())
        xd = torch.zeros(rdeg, rdeg, dtype=torch.float64)
        xd[:, :-1] = ring_shard / m["ib_bytes_per_s"] + lat
        hy_dense = a2a / m["nvlink_bytes_per_s"] + 2 * lat * (u - 1) + float(torch.maximum(c, xd).amax(0).sum())
        rows.append(dict(base, method=f"hybrid {u}x{rdeg}", bytes_max=a2a + float(gsends.sum(1).max()) * ring_shard,
                         dense_bytes_max=a2a + (rdeg - 1) * ring_shard, steps_skipped_max=int((~gneed).sum(1).max()),
                         time_s=hy_time, dense_time_s=hy_dense))
    return rows


# -- measured -----------------------------------------------------------------------


def _measure_cases(quick: bool):
    from foveal.patterns import Causal, Neighborhood, Sinks, SlidingWindow

    n = 4096 if quick else 16384
    side = 64 if quick else 128
    return [
        ("causal", Causal(n), "zigzag"),
        ("sinks 4 + window 256", Sinks(n, 4) | SlidingWindow(n, 256), "contiguous"),
        (f"7x7 neighbourhood {side}x{side}", Neighborhood((side, side), 7), "contiguous"),
    ]


def _measure_worker(rank, world, init_file, out_dir, quick):
    import datetime

    import torch.distributed as dist

    from foveal.bench.timing import time_call
    from foveal.distributed import ContextParallel, CPStats
    from foveal.functional import attend

    torch.set_num_threads(1)  # one thread per process, and for the single-process baseline
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    dev = torch.device("cpu")
    heads = 4 * world if world != 3 else 6
    rows = []
    for name, pattern, order in _measure_cases(quick):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, pattern.n_q, 64, generator=gen) for _ in range(3))
        single = {}
        if rank == 0:  # single-process attend (one thread), while the others wait

            def fwd():
                attend(q, k, v, pattern)

            def fwd_bwd():
                qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
                attend(qq, kk, vv, pattern).sum().backward()

            single = {
                "fwd": time_call(fwd, dev, min_runs=2, max_runs=3)[1],
                "fwd+bwd": time_call(fwd_bwd, dev, min_runs=2, max_runs=3)[1],
            }
        dist.barrier()
        methods = ["ring", "allgather"] + (["ulysses"] if heads % world == 0 else []) + (["hybrid"] if world == 4 else [])
        for method in methods:
            cp = ContextParallel(pattern, order=order, method=method, ulysses_degree=2 if method == "hybrid" else None)
            ql, kl, vl = (cp.shard(t) for t in (q, k, v))
            stats = CPStats()
            cp.attend(ql, kl, vl, stats=stats)  # warm: plans
            stats = CPStats()
            cp.attend(ql, kl, vl, stats=stats)
            sent = stats.total_sent

            def fwd():
                cp.attend(ql, kl, vl)

            def fwd_bwd():
                qq, kk, vv = (t.clone().requires_grad_() for t in (ql, kl, vl))
                cp.attend(qq, kk, vv).sum().backward()

            for what, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                dist.barrier()
                _, med, _ = time_call(fn, dev, min_runs=2, max_runs=3)
                times = [None] * world
                dist.all_gather_object(times, (med, sent))
                if rank == 0:
                    slowest = max(t for t, _ in times)
                    rows.append({
                        "kind": "measured", "pattern": name, "n": pattern.n_q, "P": world, "order": order,
                        "method": method, "pass": what, "time_s": slowest, "single_s": single[what],
                        "ratio": slowest / single[what], "bytes_sent_max_fwd": max(b for _, b in times),
                    })
    if rank == 0:
        Path(out_dir, "measured.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def measure(quick: bool, worlds=None, progress=True) -> list[dict]:
    import torch.multiprocessing as mp

    worlds = worlds or MEASURED_WORLDS[quick]
    rows = []
    for world in worlds:
        if progress:
            print(f"foveal bench cp: measuring on {world} processes", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_measure_worker, args=(world, os.path.join(tmp, "init"), tmp, quick), nprocs=world, join=True)
            rows += json.loads(Path(tmp, "measured.json").read_text())
    return rows


# -- report -------------------------------------------------------------------------


def _fmt_bytes(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


def _report(measured, simulated) -> str:
    lines = ["# foveal bench cp", ""]
    if measured:
        lines += [
            "## Measured on this machine (gloo, CPU processes sharing its cores)",
            "",
            "Median warm time of the slowest rank, and its ratio to single-process `attend` on the",
            "same tensors in the same run (ratio < 1: faster). Every process, and the single-process",
            "baseline, runs one thread; with P free cores the ideal ratio is 1/P. On a shared machine",
            "the processes compete with each other and with other work, so read ratios, not times.",
            "",
            "| pattern | N | P | order | method | pass | time | 1 process | ratio | bytes sent / rank (fwd) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in measured:
            lines.append(
                f"| {r['pattern']} | {r['n']} | {r['P']} | {r['order']} | {r['method']} | {r['pass']} | "
                f"{r['time_s'] * 1e3:.1f} ms | {r['single_s'] * 1e3:.1f} ms | {r['ratio']:.2f} | {_fmt_bytes(r['bytes_sent_max_fwd'])} |"
            )
        lines.append("")
    lines += [
        "## Simulated from the layouts (no tensors)",
        "",
        "Model (assumptions): " + "; ".join(f"{k}: {v}" for k, v in MODEL.items() if isinstance(v, str)) + ".",
        f"Compute {MODEL['flops_per_s'] / 1e12:.0f} TFLOP/s per GPU; {MODEL['nvlink_bytes_per_s'] / 1e9:.0f} GB/s "
        f"within a node of {MODEL['gpus_per_node']} (NVLink), {MODEL['ib_bytes_per_s'] / 1e9:.0f} GB/s across nodes "
        f"(InfiniBand), {MODEL['latency_s'] * 1e6:.0f} µs per message.",
        "",
        "`load` is the largest per-rank number of attended blocks over the mean (1.00: balanced).",
        "`bytes` is the most any rank sends for K/V (q and output too for Ulysses) in one forward pass;",
        "`dense` the same method without skipping (ring: every step; all-gather: every shard).",
        "Everything is counted at the plan's block size (`block`, at most 1024 blocks per sequence",
        "here): a block pair with one allowed pair counts in full, so thin patterns (4 sink tokens",
        "in a 4096-token block) are charged the whole block's compute and, for the all-gather, bytes.",
        "",
        "| pattern | N | P | order | block | load | method | bytes / rank | dense | steps skipped | predicted | dense predicted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in simulated:
        lines.append(
            f"| {r['pattern']} | {r['n']} | {r['P']} | {r['order']} | {r['block']} | {r['load_max_over_mean']:.2f} | {r['method']} | "
            f"{_fmt_bytes(r['bytes_max'])} | {_fmt_bytes(r['dense_bytes_max'])} | {r['steps_skipped_max']} | "
            f"{r['time_s'] * 1e3:.2f} ms | {r['dense_time_s'] * 1e3:.2f} ms |"
        )
    return "\n".join(lines) + "\n"


#: processes measured, sequence lengths and ranks simulated: by ``quick``
MEASURED_WORLDS = {True: (2,), False: (2, 4)}
SIM_SIZES = {True: (1 << 16,), False: (1 << 16, 1 << 20, 1 << 22)}
SIM_WORLDS = {True: (2, 8, 64), False: (2, 8, 64, 256, 1024)}
#: registry sizes (``foveal bench run cp --size S``) → keyword arguments of ``run``
SIZES = {"dry": dict(quick=True, measured=False, sizes=(4096,), worlds=(2, 8)), "quick": dict(quick=True),
         "full": dict(quick=False)}


def _simulated(sizes, worlds):
    """(n, pattern name, pattern, ranks, order) of every simulated case."""
    return [(n, name, pattern, p, order) for n in sizes for name, pattern in _sim_patterns(n) for p in worlds
            for order in ("contiguous", "zigzag", "balanced")]


def cases(size: str) -> list[str]:
    """The cases of a size: measured (pattern on P processes) and simulated (pattern, N, P, order)."""
    kw = SIZES[size]
    quick = kw["quick"]
    measured = [f"measured {name} on {w} processes" for w in MEASURED_WORLDS[quick]
                for name, _, _ in _measure_cases(quick)] if kw.get("measured", True) else []
    sizes, worlds = kw.get("sizes") or SIM_SIZES[quick], kw.get("worlds") or SIM_WORLDS[quick]
    return measured + [f"simulated {name}, N={n}, P={p}, {order}" for n, name, _, p, order in _simulated(sizes, worlds)]


def run_suite(size: str, out_dir: str = "bench-out", *, device=None, contenders=None, limit=None) -> dict:
    """The registry's entry: ``run`` of a size (CPU processes only; dry: the simulation alone)."""
    if device not in (None, "cpu") or contenders is not None:
        raise ValueError("the cp suite runs on CPU processes with fixed methods: "
                         "--device and --contenders do not apply")
    return {"rows": run(out_dir, **SIZES[size])}


def run(out_dir="bench-out", quick: bool = True, progress=True, measured: bool = True, sizes=None, worlds=None) -> list[dict]:
    """Measure (2–4 CPU processes) and simulate (P up to 1024, N up to 4M); write cp-cpu.json and .md; return rows.

    ``sizes`` and ``worlds`` override the simulated sequence lengths and rank counts.
    """
    start = time.perf_counter()
    rows = measure(quick, progress=progress) if measured else []
    sizes, worlds = sizes or SIM_SIZES[quick], worlds or SIM_WORLDS[quick]
    sim = []
    for n, name, pattern, p, order in _simulated(sizes, worlds):
        if progress:
            print(f"foveal bench cp: simulating {name}, N={n}, P={p}, {order}", file=sys.stderr, flush=True)
        for row in simulate(n, p, pattern, _sim_order(order, n, p)):
            row["pattern"] = name
            row["kind"] = "simulated"
            sim.append(row)
    rows += sim
    result = {"model": MODEL, "rows": rows, "seconds": time.perf_counter() - start}
    write_report(out_dir, NAME, result, _report([r for r in rows if r["kind"] == "measured"], sim))
    return rows
