"""The ``foveal`` command: ``foveal show`` (mask pictures) and ``foveal check`` (exactness check)."""

from __future__ import annotations

import argparse
import sys


def _show(args) -> int:
    from foveal import show

    if args.gallery:
        paths = show.gallery(args.gallery)
        for p in paths:
            print(p)
        print(f"wrote {len(paths)} pictures to {args.gallery}")
        return 0
    if args.module:
        return _show_module(args)
    if not args.pattern:
        print("foveal show: give a pattern expression, --module EXPR --grid G, or --gallery DIR", file=sys.stderr)
        return 2
    if args.grid:
        print("foveal show: --grid goes with --module (a pattern carries its own grid)", file=sys.stderr)
        return 2
    try:
        pattern = show.parse_pattern(args.pattern)
        out = args.output or "pattern.png"
        path = show.render(pattern, out, query=args.query, block=args.block)
    except (ValueError, TypeError) as e:
        print(f"foveal show: {e}", file=sys.stderr)
        return 2
    print(f"{pattern!r}: density {pattern.density():.2%}\nwrote {path}")
    return 0


def _show_module(args) -> int:
    from foveal import show

    if args.pattern:
        print("foveal show: give either a pattern expression or --module, not both", file=sys.stderr)
        return 2
    if not args.grid:
        print("foveal show: --module needs --grid, e.g. --grid 16,16 (or --grid 64 for a sequence)", file=sys.stderr)
        return 2
    try:
        module = show.parse_module(args.module)
        grid = show.parse_grid(args.grid)
        pattern, note = show.module_pattern(module, grid)
        out = args.output or "pattern.png"
        path = show.render_module(module, grid, out, query=args.query, block=args.block, label=args.module)
    except (ValueError, TypeError) as e:
        print(f"foveal show: {e}", file=sys.stderr)
        return 2
    print(f"{type(module).__name__} on grid {grid}: {pattern!r}: density {pattern.density():.2%}")
    if note:
        print(note)
    print(f"wrote {path}")
    return 0


def _check(args) -> int:
    from foveal.check import check_all

    return 0 if check_all(tolerance=args.tolerance) else 1


def _bench(args) -> int:
    if args.what == "speed":
        from foveal.bench.speed import run_speed

        try:
            run_speed(args.suite or "quick", args.out, args.device, args.contenders)
        except ValueError as e:
            print(f"foveal bench speed: {e}", file=sys.stderr)
            return 2
        return 0
    if args.what == "quality":
        return _quality(args)
    if args.what == "cp":
        from foveal.bench.cp import run

        suite = args.suite or "quick"
        if suite not in ("quick", "full"):
            print(f"foveal bench cp: --suite must be quick or full, got {suite!r}", file=sys.stderr)
            return 2
        run(args.out, quick=suite == "quick")
        return 0
    print(f"foveal bench: unknown benchmark {args.what!r}", file=sys.stderr)
    return 2


#: ``--suite`` of ``foveal bench quality``: which suites of which benchmark it runs
QUALITY_SUITES = {
    "quick": ("lm-quick", "vision-quick"),
    "full": ("lm", "vision"),
    "lm-quick": ("lm-quick",),
    "lm": ("lm",),
    "lm-hard": ("lm-hard",),
    "vision-quick": ("vision-quick",),
    "vision": ("vision",),
    "vision-hard": ("vision-hard",),
    "real-quick": ("real-quick",),
    "real": ("real",),
}


def _quality(args) -> int:
    suite = args.suite or "quick"
    if suite not in QUALITY_SUITES:
        print(f"foveal bench quality: --suite must be one of {list(QUALITY_SUITES)}, got {suite!r}", file=sys.stderr)
        return 2
    for part in QUALITY_SUITES[suite]:
        if part.startswith("real"):
            from foveal.bench.quality_real import run_real_quality
            from foveal.bench.real_models import ModelMissing

            try:
                run_real_quality(part, args.out, limit=args.limit)
            except (ValueError, ModelMissing) as e:
                print(f"foveal bench quality: {e}", file=sys.stderr)
                return 2
            continue
        if part.startswith("vision"):
            from foveal.bench.quality_vision import run_vision_quality as run
        else:
            from foveal.bench.quality_lm import run_lm_quality as run
        try:
            run(part, args.out)
        except ValueError as e:
            print(f"foveal bench quality: {e}", file=sys.stderr)
            return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="foveal", description="Structured local-global attention.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("show", help="draw the mask and block layout of a pattern (or a module's pattern) as a PNG")
    p.add_argument("pattern", nargs="?", help='a pattern expression, e.g. "Neighborhood(grid=(16,16), kernel_size=5)"')
    p.add_argument("-o", "--output", help="PNG path (default: pattern.png)")
    p.add_argument("--query", type=int, default=None, help="token whose keys are drawn (N-D patterns; default: centre)")
    p.add_argument("--block", type=int, default=None, help="block size of the layout panel (default: automatic)")
    p.add_argument("--module", metavar="EXPR",
                   help='draw the pattern a foveal.nn module uses, e.g. "WindowAttention(dim=32, num_heads=2, '
                   'window_size=4)"')
    p.add_argument("--grid", help="grid the module's pattern is drawn on, e.g. 16,16 (with --module)")
    p.add_argument("--gallery", metavar="DIR",
                   help="write one picture per built-in pattern into DIR, one per attention module into DIR/modules")
    p.set_defaults(func=_show)

    c = sub.add_parser("check", help="check every built-in pattern on every backend against dense attention")
    c.add_argument("--tolerance", type=float, default=1e-5)
    c.set_defaults(func=_check)

    b = sub.add_parser("bench", help="benchmarks: speed, quality, cp (context parallelism)")
    b.add_argument("what", choices=["speed", "quality", "cp"])
    b.add_argument(
        "--suite",
        default=None,
        help="speed: quick (about 2 minutes on a 2-core CPU), full, timm-quick or timm (timm models converted by "
        "foveal.integrations.timm against the originals), modules-quick (about 1 minute) or modules "
        "(foveal.nn modules against the same modules on dense masked SDPA), lm-quick (about 2 minutes) or lm (the "
        "language-model cases as ratios to SDPA: prefill at 4k and 16k, decoding; 15-20 minutes); quality: quick (a few minutes), full, "
        "lm-quick, lm, lm-hard (MQAR and reverse, uncalibrated), vision-quick, vision (tiny models trained under "
        "each mixer, 3 seeds, the calibrated cue-seg task) or vision-hard (pathfinder and glyph matching, "
        "uncalibrated), real-quick (SmolLM2-135M at 1024 tokens, every recipe at density 0.1; about 2 minutes) or real "
        "(pretrained SmolLM2-135M, Gemma-3-270M and all-MiniLM-L6-v2 with every recipe at densities 0.05, 0.1, 0.2: "
        "perplexity, KL and top-1 agreement with full attention, passkey and multi-key retrieval, embedding cosine, "
        "prefill time; about 33 minutes; needs `make bench-models`); cp: quick or full (default: quick)",
    )
    b.add_argument("--out", default="bench-out", help="folder for the JSON, Markdown and PNG results")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--contenders", nargs="+", default=None, help="run only these contenders (names as in the table)")
    b.add_argument("--limit", type=int, default=None,
                   help="quality real suites: run only the first N pattern rows of each model (to check a run starts)")
    b.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
