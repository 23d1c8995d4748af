"""The one registry of foveal's benchmarks: ``foveal bench --list`` prints it, ``foveal bench run NAME`` runs from it.

A suite is a module of ``foveal.bench`` named as the suite (``quality-lm`` is
``foveal/bench/quality_lm.py``) with

* ``SIZES``: size → the module's own configuration of that size; every suite has a
  ``dry`` size (its smallest case, a round or a step: seconds, for the tests and for a
  check that a run starts), most a ``quick`` and a ``full`` one;
* ``cases(size) -> list[str]``: what a size runs, one line per case, without running it
  (``foveal bench run NAME --size SIZE --cases``);
* ``run_suite(size, out_dir, *, device=None, contenders=None, limit=None) -> dict``:
  lists the size's cases, measures them with the one timer (``timing``: interleaved
  rounds on the same tensors) or trains them, turns them into rows and hands those to
  the one report writer (``report.write_report``: table, JSON, plots, provenance).

Its result is written as the suite's name, with the device for timing suites
(``speed-cpu.json``, ``quality-lm.json``): the name it carries when committed in
``benchmarks/``. The older command lines (``foveal bench speed --suite lm``, ``foveal
bench quality --suite vision``, ``foveal bench cp --suite full``) are ``LEGACY`` names for
(suite, size) pairs.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field

__all__ = ["Suite", "SUITES", "LEGACY", "get", "resolve", "listing"]


@dataclass(frozen=True)
class Suite:
    name: str
    #: "speed" (timed; its result carries the device) or "quality"
    kind: str
    summary: str
    #: size → what it runs (the first after "dry" is the default)
    sizes: dict = field(default_factory=dict)
    #: optional modules the suite needs (besides foveal's own dependencies), and how to install them
    needs: tuple[str, ...] = ()
    install: str = "make install"
    #: the one device a timing suite runs on (None: ``--device``, default cuda if available)
    device: str | None = None
    #: the files it writes besides NAME.json and NAME.md
    plots: str = "NAME.png"
    #: what ``--limit N`` keeps (None: the suite takes no limit)
    limit: str | None = None

    @property
    def module(self) -> str:
        return "foveal.bench." + self.name.replace("-", "_")

    @property
    def default_size(self) -> str:
        return next(s for s in self.sizes if s != "dry")

    def missing(self) -> list[str]:
        """The modules of ``needs`` that are not installed."""
        return [m for m in self.needs if importlib.util.find_spec(m) is None]

    def result_name(self, device=None) -> str:
        """The file name of this suite's result (``speed-cpu``, ``quality-lm``)."""
        from foveal.bench.report import result_name

        if self.kind != "speed":
            return self.name
        import torch

        return result_name(self.name, self.device or device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def cases(self, size: str | None = None) -> list[str]:
        """What one size of the suite runs, one line per case (nothing is run)."""
        size = size or self.default_size
        if size not in self.sizes:
            raise ValueError(f"suite {self.name}: size must be one of {list(self.sizes)}, got {size!r}")
        return importlib.import_module(self.module).cases(size)

    def run(self, size: str | None = None, out_dir: str = "bench-out", *, device=None, contenders=None,
            limit=None, command: str | None = None) -> dict:
        """Run one size of the suite (default: ``default_size``) and write its report into ``out_dir``."""
        from foveal.bench.report import begin

        size = size or self.default_size
        if size not in self.sizes:
            raise ValueError(f"suite {self.name}: size must be one of {list(self.sizes)}, got {size!r}")
        if limit is not None and (self.limit is None or isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"suite {self.name}: " + (f"--limit must be a whole number >= 1, got {limit!r}"
                                                       if self.limit else "takes no --limit"))
        begin(command)
        return importlib.import_module(self.module).run_suite(size, out_dir, device=device, contenders=contenders,
                                                              limit=limit)


_DRY = "the smallest case, one step or round (seconds: a check that it runs)"
SUITES = {s.name: s for s in [
    Suite("speed", "speed", "every contender (foveal's backends, dense and masked SDPA, compiled flex, NATTEN, "
          "local-attention) on the same tensors: time, setup, compile, peak memory, useful FLOP/s",
          {"dry": _DRY, "quick": "NA 7x7 on 64², causal window 512 at 8k (about 2 minutes)",
           "full": "NA 2-D and 3-D, windows up to 64k, streaming, the 64k memory case",
           "targets": "the native-kernel issue's cases: NA 7x7 on 64² and causal window 512 at 16k, fwd and fwd+bwd"}),
    Suite("modules", "speed", "every attention module of foveal.nn against itself on dense masked SDPA and on the "
          "dense reference, forward and forward+backward",
          {"dry": _DRY, "quick": "grids 14² and 28² (about 1 minute)", "full": "grids 14² to 112² (7 minutes)"}),
    Suite("lm", "speed", "language-model cases as ratios to SDPA: prefill (causal, window + sinks, vertical-slash, "
          "block top-k, DHSA), decoding over caches, per-call overhead",
          {"dry": _DRY, "quick": "prefill at 1k and 2k (about 2 minutes)",
           "full": "prefill at 4k and 16k (6 minutes)"}),
    Suite("timm", "speed", "timm models converted by foveal.integrations.timm against the originals (same weights)",
          {"dry": "a tiny Swin at 64²", "quick": "6 models at their native side and 2×",
           "full": "6 models at their native side and 4× (2.5 minutes)"}, needs=("timm",), plots=""),
    Suite("plan-build", "speed", "the cpu backend's gather plan: build time per pattern, and a cold attend call "
          "(plan built) against a warm one (plan cached)",
          {"dry": _DRY, "quick": "patterns of 16k tokens", "full": "patterns of 64k tokens"}, device="cpu", plots=""),
    Suite("cp", "speed", "context parallelism: measured on 2-4 gloo CPU processes, simulated from the layouts up "
          "to 1024 ranks and 4M tokens",
          {"dry": "simulation only, 4k tokens, 2 and 8 ranks", "quick": "2 processes, 4k (about 2 minutes)",
           "full": "2 and 4 processes, 16k (15 minutes)"}, device="cpu", plots=""),
    Suite("quality-lm", "quality", "tiny language models trained under every pattern family at matched densities "
          "(passkey, in-context regression, cross-attention tasks)",
          {"dry": _DRY, "quick": "a few minutes, too short to learn", "full": "the calibrated tasks (20 minutes)",
           "hard": "MQAR and reverse, uncalibrated"}),
    Suite("quality-vision", "quality", "tiny vision backbones trained under every token mixer, 3 seeds (cue-seg)",
          {"dry": _DRY, "quick": "every task and mixer, 20 steps (25 s)", "full": "cue-seg, 3 seeds (23 minutes)",
           "hard": "pathfinder and glyph matching, uncalibrated"}),
    Suite("vision-calibration", "quality", "learning curves of full attention on the vision tasks: whether a task "
          "can rank mixers within a budget",
          {"dry": _DRY, "quick": "cue-seg 16², 300 steps", "full": "the runs behind BENCHMARKS.md's calibration table "
           "(hours)"}, limit="the first N runs"),
    Suite("quality-real", "quality", "every recipe inside pretrained SmolLM2-135M, Gemma-3-270M and MiniLM, "
          "training-free: perplexity, KL, top-1, passkey, multi-key, embedding cosine, prefill time",
          {"dry": "a tiny random Llama with a character tokenizer (no weights)",
           "quick": "SmolLM2 at 1024 tokens, density 0.1 (about 2 minutes)",
           "full": "three models, densities 0.05, 0.1, 0.2 (33 minutes; make bench-models)",
           "long": "SmolLM2 prefill at 8k, all layers sparse at density 0.1 (4 recipes) against its sdpa; passkey a "
                   "third of the way into 4k and 8k (about 25 minutes)"},
          needs=("transformers",), plots="NAME-MODEL.png", limit="the first N pattern rows of each model"),
]}

#: the older command lines: ``foveal bench WHAT --suite NAME`` → the (suite, size) pairs it runs
LEGACY = {
    "speed": {"quick": [("speed", "quick")], "full": [("speed", "full")],
              "modules-quick": [("modules", "quick")], "modules": [("modules", "full")],
              "lm-quick": [("lm", "quick")], "lm": [("lm", "full")],
              "timm-quick": [("timm", "quick")], "timm": [("timm", "full")]},
    "quality": {"quick": [("quality-lm", "quick"), ("quality-vision", "quick")],
                "full": [("quality-lm", "full"), ("quality-vision", "full")],
                "lm-quick": [("quality-lm", "quick")], "lm": [("quality-lm", "full")],
                "lm-hard": [("quality-lm", "hard")], "vision-quick": [("quality-vision", "quick")],
                "vision": [("quality-vision", "full")], "vision-hard": [("quality-vision", "hard")],
                "real-quick": [("quality-real", "quick")], "real": [("quality-real", "full")],
                "real-long": [("quality-real", "long")]},
    "cp": {"quick": [("cp", "quick")], "full": [("cp", "full")]},
}


def get(name: str) -> Suite:
    """The suite called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in SUITES:
        raise ValueError(f"suite must be one of {list(SUITES)}, got {name!r}")
    return SUITES[name]


def resolve(what: str, suite: str | None) -> list[tuple[str, str]]:
    """The (suite, size) pairs of an older command line ``foveal bench WHAT --suite SUITE`` (default: quick)."""
    names = LEGACY[what]
    suite = suite or "quick"
    if suite not in names:
        raise ValueError(f"--suite must be one of {list(names)}, got {suite!r}")
    return names[suite]


def listing() -> str:
    """The registry as text: one block per suite, its sizes, what it needs, and where its result goes."""
    lines = []
    for s in SUITES.values():
        missing = s.missing()
        need = f"  needs {', '.join(s.needs)}" + (f" (missing: {s.install})" if missing else "") if s.needs else ""
        lines.append(f"{s.name:<20} {s.kind:<8} {s.summary}")
        name = s.name if s.kind != "speed" else f"{s.name}-{s.device or 'DEVICE'}"
        files = ", ".join([f"{name}.json", f"{name}.md"] + ([s.plots.replace("NAME", name)] if s.plots else []))
        lines.append(f"{'':<20} result: {files}{need}")
        if s.limit:
            lines.append(f"{'':<20}   --limit N     {s.limit}")
        for size, text in s.sizes.items():
            lines.append(f"{'':<20}   --size {size:<6} {text}")
    return "\n".join(lines)
