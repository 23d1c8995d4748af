"""Suite ``modules``: foveal's attention modules against the same modules on dense attention.

Each attention module of ``foveal.nn`` is timed on channels-last inputs of growing
grids, forward and forward+backward (gradients of the input and of every parameter),
three ways with the same weights and the same input:

* ``foveal auto`` — the module as users run it (``backend="auto"``);
* ``foveal reference`` — the module with every ``attend`` call on foveal's dense,
  exact reference kernel (float32 N×N scores);
* ``torch sdpa + mask`` — the module with every ``attend`` call replaced by
  ``torch.nn.functional.scaled_dot_product_attention`` with the pattern's dense
  boolean mask (``pattern.dense_mask()``, built once per pattern and cached, as a
  user of dense attention would), and, where the module has an additive score term
  (relative-position tables, HaloNet's relative logits), that term materialised as a
  dense float mask on every call (as Swin/timm gather their table in every forward).
  Where a module needs the log-sum-exp (Scale-DiT's merge of local and latent
  attention), it is computed from the dense scores.

Only the kernel changes between the three: the swap is done through foveal's own
backend protocol — two backends (``bench-sdpa``, ``bench-reference``) are registered
in ``foveal.kernels.select.BACKENDS`` for the duration of the run and the modules'
``backend`` attributes point at them — so the projections, padding, biases and
merges around ``attend`` are the module's own code in every row. A dense row whose
estimated working set exceeds ``DENSE_CAP_BYTES`` is refused by its backend's
``why_not`` before any work and reported as skipped, with the estimate.

Every row reports the median warm time, the peak extra memory, the time as a ratio
to ``torch sdpa + mask`` of the same case, and the largest absolute difference of
the output (forward) or of the output and every gradient (forward+backward) from the
dense reference row (or, where that was skipped, from the SDPA row). Mixers that are
not attention (focal modulation, ELA, DaViT's channel attention) are timed as
absolute baselines, without a dense twin.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from foveal.bench.measure import progress
from foveal.bench.report import result_name, with_provenance, write_report
from foveal.bench.timing import load, time_interleaved
from foveal.bias import RelativePositionBias

__all__ = ["ModuleCase", "MODULE_SUITES", "SIZES", "MODULE_CONTENDERS", "DENSE_CAP_BYTES", "dense_backends",
           "cases", "run_modules", "run_suite"]

#: a dense row is skipped when its estimated N×N working set exceeds this
DENSE_CAP_BYTES = 2 * 2**30
#: warm runs of each contender add up to at least this many seconds (at most 25 runs; 2 for slow calls)
MIN_SECONDS = 0.5
#: contender name -> foveal backend the module's ``attend`` calls use
MODULE_CONTENDERS = {"foveal auto": "auto", "foveal reference": "bench-reference", "torch sdpa + mask": "bench-sdpa"}
MIXER = "module (no attention)"
_SKIP = "dense working set"


# -- the two dense backends ------------------------------------------------------------


def _chunked(fn, n_q: int, device, rows: int = 256):
    """``fn(q_idx)`` over all query rows in chunks (bounded index intermediates), concatenated on dim 1."""
    parts = [fn(torch.arange(s, min(s + rows, n_q), device=device)[None, :, None]) for s in range(0, n_q, rows)]
    return torch.cat(parts, dim=1)


def _relative_index(bias: RelativePositionBias, n_kv: int, device) -> torch.Tensor:
    """(Nq, Nk) flat index into ``bias.table[h]`` (``RelativePositionBias.table_index``), in bounded chunks."""
    kv = torch.arange(n_kv, device=device)[None, None, :]
    return _chunked(lambda qi: torch.broadcast_to(bias.table_index(qi, kv), (1, qi.shape[1], n_kv)),
                    math.prod(bias.grid), device)[0]


def _estimate(call, kind: str) -> int:
    """Bytes of the N×N tensors a dense call keeps alive (an estimate, for the cap)."""
    b, hq = call.q.shape[:2]
    pairs = call.pattern.n_q * call.pattern.n_kv
    grad = call.needs_grad
    bias = call.bias is not None
    if kind == "reference":  # mask, bias, float32 scores, exp, softmax (+ their gradients)
        return pairs + (pairs * hq * 4 if bias else 0) + pairs * b * hq * 4 * (9 if grad else 4)
    total = pairs  # cached bool mask
    if bias:
        total += pairs * hq * 4 * (2 if grad else 1)  # float mask (+ its gradient)
        total += pairs * 8 if isinstance(call.bias, RelativePositionBias) else 0  # cached int64 index
    if (bias and grad) or call.need_lse:  # SDPA's math path / the dense log-sum-exp: scores and softmax
        total += pairs * b * hq * 4 * (6 if grad else 3)
    return total


class _Capped:
    """A dense backend that refuses calls whose N×N working set would exceed the cap."""

    kind = ""

    def __init__(self, cap: int):
        self.cap = cap

    def why_not(self, call) -> list[str]:
        need = _estimate(call, self.kind)
        if need > self.cap:
            return [
                f"{_SKIP} of about {need / 2**30:.1f} GiB for {call.pattern.n_q}x{call.pattern.n_kv} pairs "
                f"exceeds the {self.cap / 2**30:.1f} GiB cap"
            ]
        return []


class DenseSDPABackend(_Capped):
    """``scaled_dot_product_attention`` with the pattern's dense mask (cached) and the dense score term."""

    name = "bench-sdpa"
    kind = "sdpa"

    def __init__(self, cap: int):
        super().__init__(cap)
        self._cache: dict[tuple, tuple[object, torch.Tensor]] = {}

    def _cached(self, key, owner, build):
        """``build()`` once per ``key``; ``owner`` is kept alive so the ids in the key stay unique."""
        if key not in self._cache:
            self._cache[key] = (owner, build())
        return self._cache[key][1]

    def dense_bias(self, call) -> torch.Tensor:
        """The score term as a dense (heads, Nq, Nk) tensor in q's dtype, differentiable.

        A ``RelativePositionBias`` is a gather from its table through an index cached per
        geometry (as Swin/timm's ``relative_position_index``); any other term (HaloNet's
        relative logits) is evaluated in chunks of query rows on every call.
        """
        bias, dev, dtype, n_kv = call.bias, call.q.device, call.q.dtype, call.pattern.n_kv
        heads = call.q.shape[1]
        if isinstance(bias, RelativePositionBias):
            key = ("rpb", bias.grid, bias.max_offset, bias.step, tuple(bias.table.shape), n_kv, dev)
            index = self._cached(key, None, lambda: _relative_index(bias, n_kv, dev))
            return bias.table.reshape(bias.table.shape[0], -1)[:, index].to(dtype).expand(heads, -1, -1)
        h = torch.arange(heads, device=dev)[:, None, None]
        kv = torch.arange(n_kv, device=dev)[None, None, :]
        return _chunked(lambda qi: bias(h, qi, kv).to(dtype).expand(heads, qi.shape[1], n_kv), call.pattern.n_q, dev)

    def run(self, call):
        q, k, v = call.q, call.k, call.v
        mask = self._cached(("mask", id(call.pattern), q.device), call.pattern,
                            lambda: call.pattern.dense_mask(device=q.device))
        attn_mask = mask
        if call.bias is not None:
            attn_mask = self.dense_bias(call).masked_fill(~mask, float("-inf"))
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=call.scale, enable_gqa=gqa)
        lse = None
        if call.need_lse:
            g = q.shape[1] // k.shape[1]
            scores = (q.float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2)) * call.scale
            if call.bias is not None:
                scores = scores + attn_mask.float()
            lse = torch.logsumexp(scores.masked_fill(~mask, -math.inf), dim=-1)
        return out, lse


class CappedReferenceBackend(_Capped):
    """foveal's dense reference kernel, refused above the cap."""

    name = "bench-reference"
    kind = "reference"

    def run(self, call):
        from foveal.kernels.select import BACKENDS

        return BACKENDS["reference"].run(call)


@contextlib.contextmanager
def dense_backends(cap: int = DENSE_CAP_BYTES):
    """Register ``bench-sdpa`` and ``bench-reference`` in foveal's backend registry while the block runs."""
    from foveal.kernels.select import BACKENDS

    added = [DenseSDPABackend(cap), CappedReferenceBackend(cap)]
    for b in added:
        if b.name in BACKENDS:
            raise RuntimeError(f"backend {b.name!r} is already registered (nested dense_backends?)")
    try:
        for b in added:
            BACKENDS[b.name] = b
        yield
    finally:
        for b in added:
            BACKENDS.pop(b.name, None)


@contextlib.contextmanager
def use_backend(module: torch.nn.Module, backend: str):
    """Point every submodule's ``backend`` attribute (the one it passes to ``attend``) at ``backend``."""
    saved = [(m, m.backend) for m in module.modules() if isinstance(getattr(m, "backend", None), str)]
    try:
        for m, _ in saved:
            m.backend = backend
        yield
    finally:
        for m, old in saved:
            m.backend = old


# -- cases -------------------------------------------------------------------------------


@dataclass
class ModuleCase:
    module: str  # label; one plot panel per label
    build: Callable[[], torch.nn.Module]
    grid: tuple[int, ...]
    dim: int = 64
    batch: int = 2
    backward: bool = False
    attention: bool = True  # calls attend over a pattern (else: an absolute baseline, no dense twin)

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def direction(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"


def _open_gate(module):
    """DANet's ``gamma`` starts at 0 (the module is the identity): set it to 1 so the attention counts."""
    with torch.no_grad():
        module.gamma.fill_(1.0)
    return module


def _attention_modules(dim: int, heads: int):
    from foveal.nn.danet import PositionAttention
    from foveal.nn.davit import SpatialBlock
    from foveal.nn.halo import HaloAttention
    from foveal.nn.hierarchical import HierarchicalLocalAttention
    from foveal.nn.maxvit import MultiAxisAttention
    from foveal.nn.neighborhood import NeighborhoodAttention2D
    from foveal.nn.window import WindowAttention

    return {
        "NeighborhoodAttention2D 7x7": lambda: NeighborhoodAttention2D(dim, heads, 7),
        "WindowAttention 7, shift 3": lambda: WindowAttention(dim, heads, 7, shift_size=3),
        "MultiAxisAttention block 7": lambda: MultiAxisAttention(dim, heads, 7, "block"),
        "MultiAxisAttention grid 7": lambda: MultiAxisAttention(dim, heads, 7, "grid"),
        "HaloAttention block 7, halo 3": lambda: HaloAttention(dim, heads, block_size=7, halo_size=3),
        "HierarchicalLocalAttention 8x8, pool 7": lambda: HierarchicalLocalAttention(dim, heads, 8, pool=7),
        "DaViT SpatialBlock 7 (no MLP)": lambda: SpatialBlock(dim, heads, 7, ffn=False),
        "PositionAttention (DANet, full)": lambda: _open_gate(PositionAttention(dim)),
    }


def _mixers(dim: int, heads: int):
    from foveal.nn.davit import ChannelAttention
    from foveal.nn.ela import EfficientLocalAttention
    from foveal.nn.focal import FocalModulation

    return {
        "FocalModulation": lambda: FocalModulation(dim),
        "EfficientLocalAttention": lambda: EfficientLocalAttention(dim),
        "ChannelAttention (DaViT)": lambda: ChannelAttention(dim, heads),
    }


def _cases(sides, dim=64, heads=2, batch=2, full_max=56):
    cases = []
    for table, attention in ((_attention_modules(dim, heads), True), (_mixers(dim, heads), False)):
        for name, build in table.items():
            for side in sides:
                if "full" in name and side > full_max:
                    continue  # full attention is quadratic for every backend: minutes per row above this
                for bwd in (False, True):
                    cases.append(ModuleCase(name, build, (side, side), dim, batch, bwd, attention))
    return cases


#: what the built-in suites run (for the report)
SETUP = (
    "batch 2, dim 64, 2 heads (head_dim 32; DANet's PositionAttention: one head, queries and keys of dim // 8); "
    "NeighborhoodAttention2D without relative-position bias (NATTEN's default); Swin and MaxViT with their "
    "relative-position tables; HaloNet with relative logits and zero-padded borders (timm's); Scale-DiT with "
    "8×8-token windows along a Hilbert curve plus a latent pooled 7×; DaViT's SpatialBlock without its MLP; "
    "DANet's PositionAttention up to 56² (full attention is quadratic on every backend)"
)


def _full():
    return _cases((14, 28, 56, 112))


def _quick():
    return _cases((14, 28))


def _dry():
    from foveal.nn.neighborhood import NeighborhoodAttention2D

    return [ModuleCase("NeighborhoodAttention2D 3x3", lambda: NeighborhoodAttention2D(16, 2, 3), (8, 8), 16, 1)]


MODULE_SUITES = {"modules": _full, "modules-quick": _quick, "modules-dry": _dry}
#: registry sizes (``foveal bench run modules --size S``) → ``MODULE_SUITES``
SIZES = {"dry": "modules-dry", "quick": "modules-quick", "full": "modules"}


# -- measuring ---------------------------------------------------------------------------


def _max_diff(a, b) -> float:
    return max((x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(a, b))


def _measure_case(case: ModuleCase, device, names, min_seconds: float) -> list[dict]:
    torch.manual_seed(0)
    module = case.build().to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, *case.grid, case.dim, generator=gen).to(device)
    grad = torch.randn(x.shape, generator=gen).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    base = {"module": case.module, "grid": "x".join(map(str, case.grid)), "tokens": case.tokens,
            "direction": case.direction, "batch": case.batch, "dim": case.dim,
            "pattern": repr(module.pattern(case.grid)) if case.attention else None}
    if case.backward:
        x.requires_grad_(True)

    def make(backend):
        def fn():
            with use_backend(module, backend):
                if not case.backward:
                    with torch.no_grad():
                        return (module(x),)
                out = module(x)
                grads = torch.autograd.grad(out, [x, *params], grad, allow_unused=True, materialize_grads=True)
                return (out.detach(), *grads)

        return fn

    contenders = {n: make(MODULE_CONTENDERS[n]) for n in names} if case.attention else {MIXER: make("auto")}
    timed = time_interleaved(contenders, device, min_seconds=min_seconds)
    rows, outputs = [], {}
    for name, t in timed.items():
        row = {**base, "contender": name}
        if "error" in t:
            text = t["error"].split(": ", 1)[-1]
            rows.append({**row, "status": f"skipped: {text}" if _SKIP in text else f"failed: {text[:160]}"})
            continue
        outputs[name] = t.pop("value")
        rows.append({**row, "status": "ok", **t})
    oracle = next((n for n in ("foveal reference", "torch sdpa + mask") if n in outputs), None)
    dense = next((r for r in rows if r["contender"] == "torch sdpa + mask" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            continue
        r["vs_dense"] = r["median_s"] / dense["median_s"] if dense else None
        r["oracle"] = oracle if oracle and r["contender"] != oracle else None
        r["max_abs_diff"] = _max_diff(outputs[r["contender"]], outputs[oracle]) if r["oracle"] else None
    return rows


# -- report ------------------------------------------------------------------------------


def _fmt_time(s):
    return "—" if s is None else (f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s")


def _short(name):
    return {"foveal reference": "reference", "torch sdpa + mask": "sdpa"}.get(name, name)


def format_table(rows) -> str:
    """One Markdown table per module: every grid, direction and contender."""
    lines = []
    for module in dict.fromkeys(r["module"] for r in rows):
        first = next(r for r in rows if r["module"] == module)
        pattern = f" — `{first['pattern']}` at {first['grid']}" if first.get("pattern") else ""
        lines += [f"\n**{module}**{pattern}\n",
                  "| grid | tokens | direction | contender | median time | first call | peak mem | × dense SDPA "
                  "| max abs diff |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["module"] == module):
            head = f"| {r['grid']} | {r['tokens']} | {r['direction']} | {r['contender']} |"
            if r["status"] != "ok":
                lines.append(f"{head} {r['status']} | | | | |")
                continue
            ratio = "—" if r["vs_dense"] is None else f"{r['vs_dense']:.2f}"
            if r["max_abs_diff"] is not None:
                diff = f"{r['max_abs_diff']:.1e} (vs {_short(r['oracle'])})"
            elif r["contender"] in ("foveal reference", "torch sdpa + mask"):
                diff = "oracle"
            else:
                diff = "—" if r["contender"] == MIXER else "— (no dense row)"
            lines.append(f"{head} {_fmt_time(r['median_s'])} | {_fmt_time(r['first_s'])} | "
                         f"{r['peak_bytes'] / 2**20:.0f} MiB | {ratio} | {diff} |")
    return "\n".join(lines)


def _ratio(row, rows, field):
    dense = next((r for r in rows if r["status"] == "ok" and r["contender"] == "torch sdpa + mask" and
                  (r["module"], r["direction"], r["tokens"]) == (row["module"], row["direction"], row["tokens"])), None)
    if dense is None:
        return None
    return row[field] / max(dense[field], 2**20) if field == "peak_bytes" else row[field] / dense[field]


def summary(rows, field: str = "median_s") -> str:
    """``foveal auto``'s ``field`` (time or peak memory) over dense masked SDPA's: module × direction against grid."""
    grids = sorted({(r["tokens"], r["grid"]) for r in rows})
    lines = ["| module | direction | " + " | ".join(g for _, g in grids) + " |", "|---|---|" + "---|" * len(grids)]
    for module in dict.fromkeys(r["module"] for r in rows if r["contender"] == "foveal auto"):
        for direction in ("fwd", "fwd+bwd"):
            cells = []
            for tokens, _ in grids:
                row = next((r for r in rows if (r["module"], r["direction"], r["tokens"], r["contender"])
                            == (module, direction, tokens, "foveal auto")), None)
                if row is None:
                    cells.append("—")
                elif row["status"] != "ok":
                    cells.append("failed")
                else:
                    x = _ratio(row, rows, field)
                    cells.append("dense skipped" if x is None else f"{x:.2f}")
            lines.append(f"| {module} | {direction} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report(result: dict) -> str:
    load = ", ".join(f"{a:.1f}" for a in result["load_before"])
    after = ", ".join(f"{a:.1f}" for a in result["load_after"])
    header = (
        f"suite `{result['suite']}` on {result['device']} ({result['machine']}); load average (1, 5, 15 min) "
        f"{load} at the start, {after} at the end: the machine was shared, read the ratios, not the times. "
        "Inputs (batch, *grid, dim) channels-last float32, the same weights and input for every contender; "
        f"dense rows skipped above a {result['cap_bytes'] / 2**30:.1f} GiB N×N working set. "
        "× dense SDPA: median time over that of the same module with `torch sdpa + mask` in place of `attend`. "
        "max abs diff: output (fwd) or output and every gradient (fwd+bwd) against the dense reference row."
    )
    if result.get("setup"):
        header += f" Modules: {result['setup']}."
    if result.get("command"):
        header += f"\n\nCommand: `{result['command']}` ({result['seconds'] / 60:.0f} minutes)."
    return (f"{header}\n\n**foveal auto, time × dense masked SDPA** (below 1: foveal is faster)\n\n"
            f"{summary(result['rows'])}\n\n**foveal auto, peak extra memory × dense masked SDPA** "
            f"(resident-memory growth, each side at least 1 MiB)\n\n{summary(result['rows'], 'peak_bytes')}\n"
            f"{format_table(result['rows'])}\n")


def plot(rows, path: Path, title: str = "foveal bench speed --suite modules"):
    """Log–log time against tokens: one panel per attention module (colour: contender, dashes: fwd+bwd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attention = list(dict.fromkeys(r["module"] for r in rows if r["contender"] != MIXER))
    mixers = list(dict.fromkeys(r["module"] for r in rows if r["contender"] == MIXER))
    panels = attention + (["non-attention mixers"] if mixers else [])
    names = list(MODULE_CONTENDERS) + mixers
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(15, 3.9 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        lines = [(panel, n) for n in MODULE_CONTENDERS] if panel in attention else [(m, MIXER) for m in mixers]
        for module, contender in lines:
            for direction, style in (("fwd", "-"), ("fwd+bwd", "--")):
                pts = sorted((r["tokens"], r["median_s"]) for r in rows if r["status"] == "ok" and
                             (r["module"], r["contender"], r["direction"]) == (module, contender, direction))
                if pts:
                    key = contender if contender != MIXER else module
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=colours[key], label=f"{key}, {direction}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("tokens")
        ax.set_ylabel("median time (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{title} — solid: forward, dashed: forward+backward")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rerender(json_path):
    """Rewrite the Markdown report and the plot of a saved run without measuring again."""
    path = Path(json_path)
    result = json.loads(path.read_text())
    path.with_suffix(".md").write_text(with_provenance(_report(result), result))
    plot(result["rows"], path.with_suffix(".png"), f"foveal bench speed --suite {result['suite']}")
    return path.with_suffix(".md"), path.with_suffix(".png")


def cases(size: str) -> list[str]:
    """The cases of a size: module, grid and direction."""
    return [f"{c.module} {'x'.join(map(str, c.grid))} {c.direction}" for c in MODULE_SUITES[SIZES[size]]()]


def run_suite(size: str, out_dir: str = "bench-out", *, device=None, contenders=None, limit=None) -> dict:
    """The registry's entry: ``run_modules`` of a size (dry: no least time per contender)."""
    return run_modules(SIZES[size], out_dir, device, contenders, min_seconds=0.0 if size == "dry" else None)


def run_modules(suite: str = "modules-quick", out_dir: str = "bench-out", device: str | None = None,
                contenders=None, *, min_seconds: float | None = None, cap_bytes: int | None = None) -> dict:
    """Run a module suite; print the report; write ``modules-DEVICE.json``, ``.md`` and ``.png`` (``modules-cpu``)."""
    if suite not in MODULE_SUITES:
        raise ValueError(f"suite must be one of {sorted(MODULE_SUITES)}, got {suite!r}")
    names = list(MODULE_CONTENDERS) if contenders is None else list(dict.fromkeys(contenders))
    unknown = [n for n in names if n not in MODULE_CONTENDERS]
    if unknown or not names:
        raise ValueError(f"contenders must be among {list(MODULE_CONTENDERS)} for module suites, got {contenders!r}")
    min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
    cap_bytes = DENSE_CAP_BYTES if cap_bytes is None else cap_bytes
    for name, value in (("min_seconds", min_seconds), ("cap_bytes", cap_bytes)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = MODULE_SUITES[suite]()
    load_before = load()
    rows, start = [], time.perf_counter()
    for i, case in enumerate(cases):
        progress(i, len(cases), f"{case.module} {case.grid} {case.direction}")
        with dense_backends(cap_bytes):  # fresh per case: its cached masks go with the case
            rows += _measure_case(case, dev, names, min_seconds)
    progress(len(cases), len(cases), f"done in {time.perf_counter() - start:.0f}s")
    sys.stderr.write("\n")
    result = {
        "suite": suite,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "load_before": load_before,
        "load_after": load(),
        "cap_bytes": cap_bytes,
        "setup": SETUP if suite in ("modules", "modules-quick") else None,
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} foveal bench speed --suite {suite} --out {out_dir}",
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    return write_report(out_dir, result_name("modules", dev), result, _report(result),
                        lambda path: plot(rows, path, f"foveal bench speed --suite {suite}"))
