"""Suite ``lm`` (``foveal bench run lm``): the cases a language-model user meets first, as ratios to SDPA.

Prefill (batch 1, 8 query heads over 2 key heads, head_dim 64, float32): causal,
StreamingLLM's window + sinks (the same pattern object each call, and built anew each
call as a model does per layer and length), vertical-slash at density ≈ 0.05 (with its
selection, and on a selection made beforehand) in its exact and its MInference range form
(``VerticalSlashRanges``), block top-k and DHSA at density ≈ 0.03, each forward and
forward+backward, timed against ``scaled_dot_product_attention`` with ``is_causal=True`` on
the same tensors in the same process. The content-selected rows run again on SmolLM2's own
q and k (layer 15 at 8192 tokens in ``full``, 2048 in ``quick``; ``captured``): real
selections cluster where random ones scatter. Decoding: one step over a
cached context of several lengths for dense, window + sinks, Quest and a SnapKV-compressed
cache, against SDPA on the same cache; and the Python overhead of one ``attend_decode``
call on a 16-token cache. Every figure is a median of warm runs; ratios are what to read.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from foveal.bench.captured import LAYER, captured_qk
from foveal.bench.measure import matmul_rate, progress, target_line
from foveal.bench.report import result_name, write_report
from foveal.bench.timing import per_call, time_interleaved, timed
from foveal.decode import KVCache, Quest, SnapKV, attend_decode, snapkv_compress
from foveal.functional import attend
from foveal.patterns import DHSA, BlockTopK, Causal, Sinks, SlidingWindow, VerticalSlash, VerticalSlashRanges

__all__ = ["LM_SUITES", "SIZES", "cases", "run_lm", "run_suite"]

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64


@dataclass
class Row:
    """One timed call, forward and forward+backward: ``make(q, k, v)`` returns ``(fn, info)`` — the call to
    time and what to report of it."""

    name: str
    make: Callable


def _sdpa(q, k, v):
    return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), {}


def _static(build_each_call: bool, make_pattern):
    def make(q, k, v):
        n = q.shape[2]
        if build_each_call:
            return (lambda: attend(q, k, v, make_pattern(n))), {"density": make_pattern(n).density()}
        p = make_pattern(n)
        return (lambda: attend(q, k, v, p)), {"density": p.density()}

    return make


def _causal_lse(q, k, v):
    p = Causal(q.shape[2])
    return (lambda: attend(q, k, v, p, return_lse=True)[0]), {"density": p.density(), "note": "lse returned"}


def _selected(make_pattern, beforehand: bool):
    def make(q, k, v):
        p = make_pattern(q.shape[2])
        with torch.no_grad():
            sel, select_s = timed(lambda: p.select(q, k), q.device)
        info = {"density": float(sel.density().mean()), "select_s": select_s}
        if beforehand:
            return (lambda: attend(q, k, v, sel)), info
        return (lambda: attend(q, k, v, p)), info

    return make


def _streaming(n):
    return SlidingWindow(n, 1024) | Sinks(n, 4)


def _topk_for(n, density):
    return max(1, round(density * n / 64))


PREFILL_ROWS = [
    Row("sdpa is_causal (baseline)", _sdpa),
    Row("causal (with lse)", _causal_lse),
    Row("window 1024 + 4 sinks, same object", _static(False, _streaming)),
    Row("window 1024 + 4 sinks, built each call", _static(True, _streaming)),
    Row("vertical-slash n/32, n/16", _selected(lambda n: VerticalSlash(n, vertical=n // 32, slash=n // 16), False)),
    Row("vertical-slash, selection made beforehand",
        _selected(lambda n: VerticalSlash(n, vertical=n // 32, slash=n // 16), True)),
    Row("vertical-slash ranges n/32, n/16",
        _selected(lambda n: VerticalSlashRanges(n, vertical=n // 32, slash=n // 16), False)),
    Row("vertical-slash ranges, selection made beforehand",
        _selected(lambda n: VerticalSlashRanges(n, vertical=n // 32, slash=n // 16), True)),
    Row("block top-k, density ~0.03", _selected(lambda n: BlockTopK(n, topk=_topk_for(n, 0.03)), False)),
    Row("DHSA, density ~0.03", _selected(lambda n: DHSA(n, budget=max(64, int(0.03 * n))), False)),
]


#: content-selected rows on q and k captured from SmolLM2 (``captured.captured_qk``; v random: speed and
#: selection do not depend on it), against SDPA on the same tensors
CAPTURED_ROWS = [PREFILL_ROWS[0]] + [r for r in PREFILL_ROWS if r.name.startswith(("vertical-slash", "block top-k"))]


def _suite(lengths, decode_lengths, min_seconds=1.0, calls=200, captured=0):
    """A suite: prefill lengths, decode context lengths, the least time per timed row, calls per decode figure,
    the length of the SmolLM2 capture (0: none)."""
    return {"lengths": lengths, "decode_lengths": decode_lengths, "min_seconds": min_seconds, "calls": calls,
            "captured": captured}


LM_SUITES = {
    "lm": _suite((4096, 16384), (1024, 4096, 16384), captured=8192),
    "lm-quick": _suite((1024, 2048), (256, 1024), captured=2048),
    "lm-dry": _suite((128,), (64,), min_seconds=0.0, calls=3),
}
#: registry sizes (``foveal bench run lm --size S``) → ``LM_SUITES``
SIZES = {"dry": "lm-dry", "quick": "lm-quick", "full": "lm"}


def _tensors(n, gen, requires_grad=False):
    q = torch.randn(1, HEADS, n, HEAD_DIM, generator=gen)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen)
    v = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _failed(e: Exception) -> dict:
    return {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}


def _time_group(n: int, backward: bool, device, min_seconds: float, on_row=None, qk=None,
                rows=PREFILL_ROWS) -> list[dict]:
    """Every row of ``rows`` at ``n`` tokens on the same tensors, timed in interleaved rounds.

    The tensors are random, or ``qk`` (captured q and k, with a random v). Each row is called
    once first (plans, selections, compile), then the rows take turns, round after round (at
    least 3, until each row has had ``min_seconds`` or 7 rounds; every row in every round:
    ``time_interleaved(together=True)``), so that the machine's drift falls on every row
    alike; each row's figure is its median.
    """
    gen = torch.Generator().manual_seed(n)
    q, k, v = _tensors(n, gen)
    if qk is not None:
        q, k = qk
        v = torch.randn(k.shape, generator=gen)
    q, k, v = (t.to(device).requires_grad_(backward) for t in (q, k, v))
    grad = torch.randn(q.shape, generator=gen).to(device)
    infos, calls = [], {}
    for i, row in enumerate(rows):
        if on_row is not None:
            on_row(i, row)
        try:
            fn, info = row.make(q, k, v)
        except Exception as e:  # a failing row is a result, not a crash of the benchmark
            infos.append(_failed(e))
            continue

        def call(fn=fn):
            if backward:
                return torch.autograd.grad(fn(), (q, k, v), grad)
            with torch.no_grad():
                return fn()

        infos.append(info)
        calls[i] = call
    timed = time_interleaved(calls, device, min_runs=3, max_runs=7, min_seconds=min_seconds, slow=float("inf"),
                             memory=False, together=True, errors=(Exception,), keep=False)
    results = []
    for i, info in enumerate(infos):
        t = timed.get(i)
        if t is None:
            results.append(info)
        elif "error" in t:
            text = t["error"].splitlines()[0][:120] if t["error"] else ""
            results.append({"status": f"failed: {t['exception']}: {text}"})
        else:
            results.append({"status": "ok", "first_s": t["first_s"], **info, "median_s": t["median_s"],
                            "runs": t["runs"]})
    return results


def _decode_rows(length: int, device, calls: int = 50) -> list[dict]:
    """One decode step over a cached context of ``length`` tokens, for each contender."""
    gen = torch.Generator().manual_seed(length)
    n = length + 1
    q, k, v = _tensors(n, gen)
    q1 = q[:, :, -1:].to(device)
    k, v = k.to(device), v.to(device)
    caches = {}
    full = KVCache(1, KV_HEADS, HEAD_DIM, device=device)
    full.append(k, v)
    caches["dense"] = full
    streaming = _streaming(n)
    window = KVCache(1, KV_HEADS, HEAD_DIM, device=device, pattern=streaming)
    for s in range(0, n - 1, 4096):  # prefill in chunks, then the step's own token
        window.append(k[:, :, s : min(s + 4096, n - 1)], v[:, :, s : min(s + 4096, n - 1)])
    window.append(k[:, :, n - 1 :], v[:, :, n - 1 :])
    snap = KVCache(1, KV_HEADS, HEAD_DIM, device=device)
    snap.append(k[:, :, : n - 1], v[:, :, : n - 1])
    snapkv_compress(snap, q[:, :, max(0, n - 1 - 256) : n - 1].to(device), SnapKV(capacity=1024))
    snap.append(k[:, :, n - 1 :], v[:, :, n - 1 :])
    kr, vr = full.k, full.v
    contenders = {
        "sdpa on the dense cache (baseline)": lambda: F.scaled_dot_product_attention(q1, kr, vr, enable_gqa=True),
        "attend_decode, dense": lambda: attend_decode(q1, full),
        "attend_decode, window 1024 + 4 sinks": lambda: attend_decode(q1, window, streaming),
        "attend_decode, Quest (16-token pages, budget 1024)": lambda: attend_decode(
            q1, full, select=Quest(page_size=16, token_budget=1024)),
        "attend_decode, SnapKV-compressed (1024 kept)": lambda: attend_decode(q1, snap),
    }
    rows = []
    with torch.no_grad():
        for name, fn in contenders.items():
            try:
                rows.append({"kind": "decode", "context": length, "contender": name, "status": "ok",
                             "median_s": per_call(fn, calls), "cached_keys": {
                                 "attend_decode, window 1024 + 4 sinks": window.size,
                                 "attend_decode, SnapKV-compressed (1024 kept)": snap.size}.get(name, n)})
            except Exception as e:
                rows.append({"kind": "decode", "context": length, "contender": name,
                             "status": f"failed: {type(e).__name__}: {str(e)[:120]}"})
    return rows


def _overhead(device, calls: int = 200) -> list[dict]:
    """µs of one ``attend_decode`` call on a 16-token cache, and of SDPA on the same tensors.

    The caches are filled as decoding fills them: the prompt, then the newest token alone.
    """
    gen = torch.Generator().manual_seed(16)
    q, k, v = _tensors(16, gen)
    cache = KVCache(1, KV_HEADS, HEAD_DIM, device=device)
    cache.append(k.to(device), v.to(device))
    q1 = q[:, :, -1:].to(device)
    window = _streaming(1 << 15)
    wcache = KVCache(1, KV_HEADS, HEAD_DIM, device=device, pattern=window)
    wcache.append(k[:, :, :-1].to(device), v[:, :, :-1].to(device))
    wcache.append(k[:, :, -1:].to(device), v[:, :, -1:].to(device))
    with torch.no_grad():
        sdpa = per_call(lambda: F.scaled_dot_product_attention(q1, cache.k, cache.v, enable_gqa=True), calls)
        dense = per_call(lambda: attend_decode(q1, cache), calls)
        stream = per_call(lambda: attend_decode(q1, wcache, window), calls)
    return [{"kind": "overhead", "contender": name, "status": "ok", "median_s": t}
            for name, t in (("sdpa, 16-token cache", sdpa), ("attend_decode, dense, 16-token cache", dense),
                            ("attend_decode, window + sinks, 16-token cache", stream))]


def _groups(cfg) -> list[tuple[int, bool]]:
    """The prefill groups of a suite: (tokens, backward), each timing every row of ``PREFILL_ROWS``."""
    return [(n, bwd) for n in cfg["lengths"] for bwd in (False, True)]


def _captured_label(n, bwd):
    return f"SmolLM2 layer {LAYER}'s q, k at n={n} {'fwd+bwd' if bwd else 'fwd'}: {len(CAPTURED_ROWS)} rows"


def cases(size: str) -> list[str]:
    """The cases of a size: prefill groups (every row of ``PREFILL_ROWS`` each), the captured groups, decode
    lengths, the overhead."""
    cfg = LM_SUITES[SIZES[size]]
    cap = [_captured_label(cfg["captured"], bwd) for bwd in (False, True)] if cfg["captured"] else []
    return ([f"prefill n={n} {'fwd+bwd' if bwd else 'fwd'}: {len(PREFILL_ROWS)} rows" for n, bwd in _groups(cfg)]
            + cap + [f"decode over {n} cached tokens" for n in cfg["decode_lengths"]] + ["decode overhead"])


def _captured_rows(n: int, device, min_seconds: float) -> list[dict]:
    """The content-selected rows on SmolLM2's q and k (``captured``), fwd and fwd+bwd; skipped rows say why."""
    from foveal.bench.real_models import ModelMissing

    try:
        qk = captured_qk(n)
    except (ModelMissing, ImportError) as e:
        return [{"kind": "captured", "tokens": n, "direction": "fwd", "contender": r.name,
                 "status": f"skipped: {e}"} for r in CAPTURED_ROWS]
    rows = []
    for bwd in (False, True):
        direction = "fwd+bwd" if bwd else "fwd"
        for row, res in zip(CAPTURED_ROWS, _time_group(n, bwd, device, min_seconds, qk=qk, rows=CAPTURED_ROWS)):
            rows.append({"kind": "captured", "tokens": n, "direction": direction, "contender": row.name, **res})
    return rows


def run_suite(size: str, out_dir: str = "bench-out", *, device=None, contenders=None, limit=None) -> dict:
    """The registry's entry: ``run_lm`` of a size (its contenders are fixed)."""
    if contenders is not None:
        raise ValueError("the lm suite has fixed contenders: --contenders does not apply")
    return run_lm(SIZES[size], out_dir, device)


def run_lm(suite: str = "lm", out_dir: str = "bench-out", device: str | None = None) -> dict:
    """Run an LM suite; print the table; write ``lm-DEVICE.json``, ``.md`` and ``.png`` (``lm-cpu``)."""
    if suite not in LM_SUITES:
        raise ValueError(f"suite must be one of {sorted(LM_SUITES)}, got {suite!r}")
    cfg = LM_SUITES[suite]
    dev = torch.device(device or "cpu")
    rate = matmul_rate(dev, torch.float32)
    groups = _groups(cfg)
    total = len(groups) * len(PREFILL_ROWS) + bool(cfg["captured"]) + len(cfg["decode_lengths"]) + 1
    rows, start = [], time.perf_counter()
    for g, (n, bwd) in enumerate(groups):
        direction = "fwd+bwd" if bwd else "fwd"

        def on_row(i, row, g=g, n=n, direction=direction):
            progress(g * len(PREFILL_ROWS) + i, total, f"prefill n={n} {direction} — {row.name} (then rounds)")

        for row, res in zip(PREFILL_ROWS, _time_group(n, bwd, dev, cfg["min_seconds"], on_row)):
            rows.append({"kind": "prefill", "tokens": n, "direction": direction, "contender": row.name, **res})
    if cfg["captured"]:
        progress(len(groups) * len(PREFILL_ROWS), total,
                 f"SmolLM2's q and k at {cfg['captured']} tokens (a forward), then its rows fwd and fwd+bwd")
        rows += _captured_rows(cfg["captured"], dev, cfg["min_seconds"])
    jobs = groups * len(PREFILL_ROWS)
    for j, length in enumerate(cfg["decode_lengths"]):
        progress(len(jobs) + j, total, f"decode over {length} cached tokens")
        rows += _decode_rows(length, dev, cfg["calls"])
    progress(total - 1, total, "decode overhead")
    rows += _overhead(dev, cfg["calls"])
    progress(total, total, f"done in {time.perf_counter() - start:.0f}s")
    sys.stderr.write("\n")
    result = {"suite": suite, "device": str(dev),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "matmul_flops": rate, "rows": rows}
    return write_report(out_dir, result_name("lm", dev), result, report(result), lambda path: plot(result, path))


def _base(rows, **where):
    for r in rows:
        if all(r.get(k) == v for k, v in where.items()) and r["status"] == "ok":
            return r
    return None


def _prefill_tables(prefill, kind) -> list[str]:
    """Markdown tables of prefill rows (``kind`` "prefill": random tensors; "captured": SmolLM2's q and k)."""
    lines = []
    for n in dict.fromkeys(r["tokens"] for r in prefill):
        for direction in ("fwd", "fwd+bwd"):
            block = [r for r in prefill if r["tokens"] == n and r["direction"] == direction]
            if not block:
                continue
            base = _base(block, contender=PREFILL_ROWS[0].name)
            what = "prefill" if kind == "prefill" else f"SmolLM2 layer {LAYER}'s q and k (v random)"
            lines += [f"**{what}, {n} tokens, {direction}**", "",
                      "| contender | × SDPA | time | density | selection (own column) |", "|---|---|---|---|---|"]
            for r in block:
                if r["status"] != "ok":
                    lines.append(f"| {r['contender']} | {r['status']} | | | |")
                    continue
                ratio = f"{r['median_s'] / base['median_s']:.2f}" if base else "—"
                sel = f"{r['select_s'] * 1e3:.0f} ms ({r['select_s'] / base['median_s']:.2f}× SDPA)" \
                    if "select_s" in r and base else ""
                dens = f"{r['density']:.3f}" if "density" in r else ""
                lines.append(f"| {r['contender']} | {ratio} | {r['median_s'] * 1e3:.0f} ms | {dens} | {sel} |")
            lines.append("")
    return lines


def report(result) -> str:
    """Markdown: prefill ratios to SDPA per length and direction, decode ratios, overhead, targets."""
    rows = result["rows"]
    lines = [f"suite `{result['suite']}` on {result['device']} ({result['machine']}); dense float32 matmul in the "
             f"same run: {result['matmul_flops'] / 1e9:.0f} GFLOP/s; batch 1, {HEADS} query heads over {KV_HEADS} "
             f"key heads, head_dim {HEAD_DIM}, float32", ""]
    for kind in ("prefill", "captured"):
        lines += _prefill_tables([r for r in rows if r["kind"] == kind], kind)
    decode = [r for r in rows if r["kind"] == "decode"]
    if decode:
        lines += ["**one decode step (1 query) over a cached context**", "",
                  "| context | contender | keys read | × SDPA on the dense cache | time |", "|---|---|---|---|---|"]
        for r in decode:
            base = _base(decode, context=r["context"], contender="sdpa on the dense cache (baseline)")
            if r["status"] != "ok":
                lines.append(f"| {r['context']} | {r['contender']} | | {r['status']} | |")
                continue
            ratio = f"{r['median_s'] / base['median_s']:.2f}" if base else "—"
            lines.append(f"| {r['context']} | {r['contender']} | {r.get('cached_keys', '')} | {ratio} | "
                         f"{r['median_s'] * 1e6:.0f} µs |")
        lines.append("")
    over = [r for r in rows if r["kind"] == "overhead"]
    if over:
        lines += ["**per-call overhead**: " + "; ".join(f"{r['contender']} {r['median_s'] * 1e6:.0f} µs" for r in over),
                  ""]
    lines += ["Targets:", targets(rows)]
    return "\n".join(lines) + "\n"


def targets(rows) -> str:
    """The speed issue's targets, as ratios from this run, met or not."""
    out = []

    def ratio(row, base, text, goal):
        if row and base:
            x = row["median_s"] / base["median_s"]
            out.append(target_line(x, text, goal))

    for kind, n in sorted({(r["kind"], r["tokens"]) for r in rows if r["kind"] in ("prefill", "captured")}):
        for d in ("fwd", "fwd+bwd"):
            base = _base(rows, kind=kind, tokens=n, direction=d, contender=PREFILL_ROWS[0].name)

            def get(name):
                return _base(rows, kind=kind, tokens=n, direction=d, contender=name)

            if kind == "captured":  # real selections: the 16k targets of random ones, at the captured length
                ratio(get("vertical-slash n/32, n/16"), base, f"SmolLM2 q, k: vertical-slash {n} {d} / SDPA", 0.3)
                ratio(get("vertical-slash ranges n/32, n/16"), base,
                      f"SmolLM2 q, k: vertical-slash ranges {n} {d} / SDPA", 0.3)
                ratio(get("vertical-slash ranges, selection made beforehand"), base,
                      f"SmolLM2 q, k: vertical-slash ranges on a selection {n} {d} / SDPA", 0.15)
                ratio(get("block top-k, density ~0.03"), base, f"SmolLM2 q, k: block top-k {n} {d} / SDPA", 0.06)
                continue
            ratio(get("causal (with lse)"), base, f"Causal {n} {d} / SDPA", 1.05)
            same, anew = get("window 1024 + 4 sinks, same object"), get("window 1024 + 4 sinks, built each call")
            ratio(anew, same, f"window+sinks {n} {d}: built each call / same object", 1.1)
            big = n >= 16384
            ratio(get("vertical-slash n/32, n/16"), base, f"vertical-slash {n} {d} / SDPA", 0.3 if big else 1.0)
            ratio(get("vertical-slash, selection made beforehand"), base,
                  f"vertical-slash on a selection {n} {d} / SDPA", 0.15 if big else 1.0)
            ratio(get("vertical-slash ranges n/32, n/16"), base, f"vertical-slash ranges {n} {d} / SDPA",
                  0.3 if big else 1.0)
            ratio(get("vertical-slash ranges, selection made beforehand"), base,
                  f"vertical-slash ranges on a selection {n} {d} / SDPA", 0.15 if big else 1.0)
            ratio(get("block top-k, density ~0.03"), base, f"block top-k {n} {d} / SDPA", 0.06 if big else 1.0)
            ratio(get("DHSA, density ~0.03"), base, f"DHSA {n} {d} / SDPA", 0.1 if big else 1.0)
    longest = max((r["context"] for r in rows if r["kind"] == "decode"), default=None)
    if longest:
        base = _base(rows, kind="decode", context=longest, contender="sdpa on the dense cache (baseline)")
        ratio(_base(rows, kind="decode", context=longest, contender="attend_decode, dense"), base,
              f"decode over {longest}: dense attend_decode / SDPA", 1.1)
        ratio(_base(rows, kind="decode", context=longest, contender="attend_decode, window 1024 + 4 sinks"), base,
              f"decode over {longest}: window + sinks / dense SDPA", 0.2)
    return "\n".join(out)


def plot(result, path: Path):
    """Left: prefill time ÷ SDPA per contender (bars per length and direction); right: decode time per token
    against context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 5.5))
    prefill = [r for r in rows if r["kind"] == "prefill" and r["status"] == "ok"]
    groups = list(dict.fromkeys((r["tokens"], r["direction"]) for r in prefill))
    names = [row.name for row in PREFILL_ROWS[1:]]
    width = 0.8 / max(len(groups), 1)
    for gi, (n, d) in enumerate(groups):
        base = _base(prefill, tokens=n, direction=d, contender=PREFILL_ROWS[0].name)
        if not base:
            continue
        ys = [(_base(prefill, tokens=n, direction=d, contender=name) or {}).get("median_s", float("nan"))
              / base["median_s"] for name in names]
        a.bar([i + gi * width for i in range(len(names))], ys, width, label=f"{n} tokens {d}")
    a.axhline(1.0, color="black", lw=1, ls="--")
    a.set_yscale("log")
    a.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(names))])
    a.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    a.set_ylabel("time ÷ SDPA is_causal (same run)")
    a.set_title("prefill")
    a.legend(fontsize=7)
    decode = [r for r in rows if r["kind"] == "decode" and r["status"] == "ok"]
    for name in dict.fromkeys(r["contender"] for r in decode):
        pts = sorted((r["context"], r["median_s"] * 1e6) for r in decode if r["contender"] == name)
        b.plot(*zip(*pts), marker="o", ls="--" if name.startswith("sdpa") else "-", label=name)
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("cached context (tokens)")
    b.set_ylabel("µs per decode step (one layer call)")
    b.set_title("decoding")
    b.grid(True, which="both", alpha=0.3)
    b.legend(fontsize=7)
    fig.suptitle(f"foveal bench speed --suite {result['suite']} ({result['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
