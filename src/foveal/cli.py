"""The ``foveal`` command: ``foveal show`` (mask pictures), ``foveal check`` (exactness check) and ``foveal bench``
(the benchmark registry: ``foveal bench --list``, ``foveal bench run NAME``)."""

from __future__ import annotations

import argparse
import shlex
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
    from foveal.bench import registry
    from foveal.bench.real_models import ModelMissing

    if args.list:
        print(registry.listing())
        return 0
    what = args.what
    try:
        if what is None:
            raise ValueError("give `run NAME` (names: foveal bench --list) or `speed`, `quality`, `cp` with --suite")
        if what == "run":
            if args.name is None or args.suite is not None:
                raise ValueError("give the suite's name after run, e.g. `foveal bench run speed --size quick` "
                                 "(names: foveal bench --list)")
            runs = [(registry.get(args.name).name, args.size)]
        else:
            if args.name is not None or args.size is not None:
                raise ValueError(f"`foveal bench {what}` takes --suite, e.g. --suite quick; or use "
                                 "`foveal bench run NAME --size SIZE`")
            runs = registry.resolve(what, args.suite)
        if args.cases:
            for name, size in runs:
                for line in registry.get(name).cases(size):
                    print(f"{name} {size or registry.get(name).default_size}: {line}")
            return 0
        for name, size in runs:
            registry.get(name).run(size, args.out, device=args.device, contenders=args.contenders, limit=args.limit,
                                   command=args.command_line)
    except (ValueError, ModelMissing) as e:
        print(f"foveal bench{' ' + what if what else ''}: {e}", file=sys.stderr)
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

    b = sub.add_parser("bench", help="benchmarks: `foveal bench --list` shows every suite, `foveal bench run NAME` "
                       "runs one")
    b.add_argument("what", nargs="?", choices=["run", "speed", "quality", "cp"],
                   help="run NAME (a suite of the registry); speed, quality and cp take the older --suite names")
    b.add_argument("name", nargs="?", help="with run: the suite (foveal bench --list)")
    b.add_argument("--list", action="store_true", help="list every suite, its sizes and where its result goes")
    b.add_argument("--cases", action="store_true", help="print the cases the command would run, and run nothing")
    b.add_argument("--size", default=None, help="with run: the suite's size, e.g. dry, quick or full (default: quick)")
    b.add_argument(
        "--suite",
        default=None,
        help="older names (each is a suite and a size of `foveal bench --list`): speed: quick, full, modules-quick, "
        "modules, lm-quick, lm, timm-quick, timm; quality: quick (lm-quick + vision-quick), full (lm + vision), "
        "lm-quick, lm, lm-hard, vision-quick, vision, vision-hard, real-quick, real; cp: quick, full (default: quick)",
    )
    b.add_argument("--out", default="bench-out", help="folder for the JSON, Markdown and PNG results")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--contenders", nargs="+", default=None,
                   help="run only these contenders (names as in the table; timm: model names; quality-vision and "
                   "vision-calibration: mixers)")
    b.add_argument("--limit", type=int, default=None,
                   help="quality-real: only the first N pattern rows of each model (to check a run starts); "
                   "vision-calibration: the first N runs")
    b.set_defaults(func=_bench)

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["foveal", *argv])
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
