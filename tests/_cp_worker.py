"""Worker processes for tests/test_distributed.py: many cases per spawned gloo group.

Each rank builds the same random full tensors, takes its shard with a
``ContextParallel`` plan, runs its ``attend`` forward and backward, and compares its rows of the output, lse and gradients with a
dense implementation written here from the definition (softmax over the keys
``pattern.mask`` allows). Results go to one JSON file per rank.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
import traceback

import torch
import torch.distributed as dist


def dense_attention(q, k, v, pattern, scale, bias=None, sinks=None):
    """softmax(q·kᵀ·scale + bias over allowed keys)·v in float64, GQA by repeating key heads; (out, lse).

    ``sinks`` (Hq,): one more key per head with that score and a zero value (learned sink logits).
    """
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    n = q.shape[2]
    idx = torch.arange(n)
    allowed = pattern.mask(idx[:, None], idx[None, :]).expand(n, n)
    s = (qd @ kd.transpose(-1, -2)) * scale
    if bias is not None:
        h = torch.arange(q.shape[1])[:, None, None]
        s = s + bias(h, idx[None, :, None], idx[None, None, :]).double()
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[None, :, None, None].expand(*s.shape[:3], 1)], -1)
        vd = torch.cat([vd, vd.new_zeros(*vd.shape[:2], 1, vd.shape[-1])], 2)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return p @ vd, lse


def make_pattern(name, n):
    from foveal.patterns import Causal, Document, Full, Neighborhood, Sinks, SlidingWindow

    if name == "causal":
        return Causal(n)
    if name == "window":
        return SlidingWindow(n, 10)
    if name == "window2":
        return SlidingWindow(n, 6, 6)
    if name == "sinks+window":
        return Sinks(n, 4) | SlidingWindow(n, 9)
    if name == "neighborhood2d":
        return Neighborhood((8, n // 8), 3)
    if name == "document":
        a = n // 3 + 2
        return Document([a, n - 2 * a + 3, a - 3], Causal)
    if name == "document-full":
        a = n // 4
        return Document([a + 5, n - a - 5], Full)
    raise ValueError(name)


def run_case(case, rank, world, group):
    from foveal.distributed import ContextParallel, CPStats

    n = case["n"]
    pattern = make_pattern(case["pattern"], n)
    dtype = getattr(torch, case.get("dtype", "float32"))
    b, hq, hkv, d, dv = case.get("shape", (2, 4, 2, 8, 8))
    gen = torch.Generator().manual_seed(case["seed"])
    q = torch.randn(b, hq, n, d, generator=gen)
    k = torch.randn(b, hkv, n, d, generator=gen)
    v = torch.randn(b, hkv, n, dv, generator=gen)
    go = torch.randn(b, hq, n, dv, generator=gen)
    gl = torch.randn(b, hq, n, generator=gen)
    scale = 1 / math.sqrt(d)
    bias = ref_bias = None
    if case.get("bias") == "alibi":
        from foveal.bias import ALiBi

        bias = ref_bias = ALiBi(hq)
    elif case.get("bias") == "rpb":
        from foveal.bias import RelativePositionBias

        grid = pattern.shape
        table = torch.randn(hq, *(2 * min(3, g - 1) + 1 for g in grid), generator=gen)
        bias = RelativePositionBias(grid, tuple(min(3, g - 1) for g in grid), table.clone().requires_grad_())
        ref_bias = RelativePositionBias(grid, tuple(min(3, g - 1) for g in grid), table.double().requires_grad_())
    sinks = ref_sinks = None
    if case.get("sinks"):
        sinks = torch.randn(hq, generator=gen)
        ref_sinks = sinks.double().requires_grad_()
        sinks = sinks.to(dtype).requires_grad_()
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = dense_attention(qr, kr, vr, pattern, scale, ref_bias, ref_sinks)
    fin = torch.isfinite(ref_lse)
    ((ref_out * go.double()).sum() + (torch.where(fin, ref_lse, 0.0) * gl.double()).sum()).backward()
    cp = ContextParallel(
        pattern, group, order=case["order"], method=case["method"], ulysses_degree=case.get("ulysses_degree"),
        backend=case.get("backend", "auto"),
    )
    ql, kl, vl = (cp.shard(t.to(dtype)).requires_grad_() for t in (q, k, v))
    stats = CPStats()
    out, lse = cp.attend(ql, kl, vl, return_lse=True, stats=stats, bias=bias, sink_logits=sinks)
    fwd_sent = {str(p): b for p, b in stats.bytes_sent.items()}
    gol, gll = cp.shard(go), cp.shard(gl[:, :, :, None])[..., 0]
    lfin = torch.isfinite(lse)
    cdt = lse.dtype  # the compute dtype: float64 for float64 inputs, float32 otherwise
    ((out.to(cdt) * gol.to(cdt)).sum() + (torch.where(lfin, lse, 0.0) * gll.to(cdt)).sum()).backward()
    errs = {}
    for name, mine, ref in (
        ("out", out, ref_out),
        ("lse", lse, ref_lse),
        ("dq", ql.grad, qr.grad),
        ("dk", kl.grad, kr.grad),
        ("dv", vl.grad, vr.grad),
    ):
        ref_d = ref.detach().double()
        ref_l = cp.shard(ref_d[..., None] if ref.dim() == 3 else ref_d)
        if ref.dim() == 3:
            ref_l = ref_l[..., 0]
        m = mine.detach().double()
        both_inf = torch.isinf(m) & torch.isinf(ref_l) & (torch.sign(m) == torch.sign(ref_l))
        diff = torch.where(both_inf, 0.0, (m - ref_l).abs())
        errs[name] = float(diff.max()) if diff.numel() else 0.0
        errs[name + "_scale"] = float(torch.where(torch.isfinite(ref_l), ref_l, 0.0).abs().max()) if ref_l.numel() else 0.0
    if case.get("bias") == "rpb":  # each rank holds its share of the table's gradient
        g = bias.table.grad.clone()
        dist.all_reduce(g, group=group)
        errs["dtable"] = float((g.double() - ref_bias.table.grad).abs().max())
        errs["dtable_scale"] = float(ref_bias.table.grad.abs().max())
    if sinks is not None:  # each rank holds its rows' share of the sink's gradient
        g = sinks.grad.clone()
        dist.all_reduce(g, group=group)
        errs["dsinks"] = float((g.double() - ref_sinks.grad).abs().max())
        errs["dsinks_scale"] = float(ref_sinks.grad.abs().max())
    return {
        "errs": errs,
        "stats": {
            "bytes_sent": {str(p): b for p, b in stats.bytes_sent.items()},
            "bytes_sent_forward": fwd_sent,
            "steps": stats.steps,
            "steps_computed": stats.steps_computed,
            "steps_skipped": stats.steps_skipped,
            "transfers_skipped": stats.transfers_skipped,
        },
    }


def run_fault(case, rank, world, group):
    """One rank raises (ring or Ulysses forward, ring or all-gather backward) or refuses its arguments, or
    the ranks disagree on shapes: every rank must raise soon after the failure, whatever the group's timeout.

    Returns what this rank raised, ``raised_at`` (wall clock, shared by the processes of one machine) and,
    on the failing rank, ``failed_at``: the moment of the failure; and (``then``) what a further call on the
    same group gave: refused once the group was shut down, a result when only arguments were refused.
    """
    import foveal.distributed.allgather as allgather
    import foveal.distributed.api as api
    import foveal.distributed.ring as ring
    from foveal.distributed import ContextParallel
    from foveal.patterns import Causal

    n, fault, bad = case["n"], case["fault"], rank == case["bad_rank"]
    method = {"raise_in_ulysses": "ulysses", "raise_in_allgather_backward": "allgather"}.get(fault, "ring")
    heads = 3 if method == "ulysses" else 2
    pattern = Causal(n)
    q = torch.randn(1, heads, n, 8, generator=torch.Generator().manual_seed(0))
    cp = ContextParallel(pattern, group, method=method)
    ql = cp.shard(q)
    k = v = ql
    originals = (ring.attend, api.attend, allgather.attend)

    result = {"raised": None, "failed_at": None}

    def failing_at(call, module=ring):
        calls, original = {"n": 0}, module.attend

        def failing(*a, **kw):
            calls["n"] += 1
            if calls["n"] == call:
                result["failed_at"] = time.time()
                raise RuntimeError("injected failure on this rank")
            return original(*a, **kw)

        return failing

    def failing_in_backward(original):
        def attend_then_fail(*a, **kw):
            out, lse = original(*a, **kw)

            def fail(grad):
                result["failed_at"] = time.time()
                raise RuntimeError("injected failure on this rank")

            out.register_hook(fail)
            return out, lse

        return attend_then_fail

    if bad and fault == "raise_mid_ring":
        ring.attend = failing_at(2)
    if bad and fault == "raise_in_ulysses":
        api.attend = failing_at(1, api)
    if bad and fault == "shape_mismatch":
        pattern = Causal(n + world)
        cp = ContextParallel(pattern, group)
        ql = k = v = torch.randn(1, heads, (n + world) // world, 8)
    if bad and fault == "refuse_arguments":
        k = ql.double()
    if bad and fault in ("refuse_arguments", "shape_mismatch"):
        result["failed_at"] = time.time()
    try:
        if fault.endswith("backward"):
            qg, kg, vg = (ql.clone().requires_grad_() for _ in range(3))  # dK/dV go back to their owners
            cp.attend(qg, kg, vg).sum().backward()  # warm, so that the peers are waiting when rank 1 fails
            if bad and method == "allgather":  # the local attention's backward fails, not an exchange
                allgather.attend = failing_in_backward(allgather.attend)
            out = cp.attend(qg, kg, vg)
            if bad and method == "ring":
                ring.attend = failing_at(1)
            out.sum().backward()
        else:
            cp.attend(ql, k, v)
    except Exception as e:  # noqa: BLE001 - the message is the result
        result["raised"], result["raised_at"] = f"{type(e).__name__}: {e}", time.time()
    finally:
        ring.attend, api.attend, allgather.attend = originals
    try:
        again = ContextParallel(Causal(n), group)
        again.attend(*(again.shard(q),) * 3)
        result["then"] = "ok"
    except Exception as e:  # noqa: BLE001
        result["then"] = f"{type(e).__name__}: {e}"
    return result


def worker(rank, world, init_file, out_dir, cases, timeout):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    results = {}
    group = dist.group.WORLD
    for case in cases:
        cid = case["id"]
        try:
            if "fault" in case:
                # a fresh group per fault: a failed exchange leaves its group unusable
                group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=case["timeout"]))
                results[cid] = run_fault(case, rank, world, group)
            else:
                results[cid] = run_case(case, rank, world, group)
        except Exception:  # noqa: BLE001
            results[cid] = {"error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def spawn(world, cases, tmp_path, timeout=30.0):
    """Run ``cases`` on ``world`` gloo processes; returns ``{case id: [result of rank 0, 1, ...]}``."""
    import torch.multiprocessing as mp

    init_file = str(tmp_path / f"init{world}")
    out_dir = str(tmp_path)
    mp.spawn(worker, args=(world, init_file, out_dir, cases, timeout), nprocs=world, join=True)
    per_rank = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            per_rank.append(json.load(f))
    return {c["id"]: [per_rank[r][c["id"]] for r in range(world)] for c in cases}
