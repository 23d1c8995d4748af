"""The one report writer of the benchmarks: table (Markdown), JSON, plots and provenance.

Every suite hands its result (a dict with its rows), its Markdown text and its plots to
``write_report``, which adds the run's provenance (command line, git commit, date,
torch version, threads, and the machine's load average at the start and at the end),
writes ``NAME.json``, ``NAME.md`` and ``NAME.png`` (or ``NAME-PART.png`` per plot) into
the output folder, prints the text and the paths, and removes the run's partial rows.
``NAME`` is the suite's registry name, with the device for timing suites
(``speed-cpu``): the name its committed result carries in ``benchmarks/``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from foveal.bench.timing import load

__all__ = ["begin", "provenance", "provenance_line", "with_provenance", "result_name", "save_partial", "write_report"]

#: the run in progress (``begin``): its command, start time and load at the start
_RUN: dict = {}


def begin(command: str | None = None) -> dict:
    """Mark the start of a run: its command line (default: this process's) and the load now."""
    _RUN.clear()
    _RUN.update(command=command or shlex.join(["foveal", *sys.argv[1:]] if sys.argv[0].endswith(("foveal", "cli.py"))
                                              else sys.argv),
                start=time.perf_counter(), load_before=load())
    return dict(_RUN)


def _commit() -> str | None:
    """The git commit of foveal's sources, or None (not a checkout, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance() -> dict:
    """Where a result comes from: command, commit, date, machine, torch, threads and the load before and after."""
    if not _RUN:
        begin()
    return {
        "command": _RUN["command"],
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_before": _RUN["load_before"],
        "load_after": load(),
        "seconds": round(time.perf_counter() - _RUN["start"], 1),
    }


def provenance_line(p: dict) -> str:
    """One Markdown line of a provenance dict."""
    def avg(x):
        return "?" if x is None else ", ".join(f"{a:.1f}" for a in x)

    commit = (p.get("commit") or "unknown")[:12]
    gpu = f", {p['cuda']}" if p.get("cuda") else ""
    return (f"_Run `{p['command']}` at commit {commit} on {p['date']} ({p['machine']}{gpu}; torch {p['torch']}, "
            f"{p['threads']} threads; load average (1, 5, 15 min) {avg(p['load_before'])} at the start, "
            f"{avg(p['load_after'])} at the end; {p['seconds']:.0f} s)._")


def with_provenance(text: str, result: dict) -> str:
    """``text`` with the provenance line of ``result`` (a saved run: rewriting its report keeps it) at its end."""
    if "provenance" not in result:
        return text
    return f"{text.rstrip()}\n\n{provenance_line(result['provenance'])}\n"


def result_name(suite: str, device=None) -> str:
    """The file name of a suite's result: the suite's name, and the device's type for timing suites."""
    return suite if device is None else f"{suite}-{torch.device(device).type}"


def save_partial(out, name: str, rows: list) -> None:
    """The rows so far, as ``name.partial.json`` in ``out`` (for long runs); ``write_report`` removes it."""
    Path(out, f"{name}.partial.json").write_text(json.dumps(rows, indent=1, default=str))


def write_report(out_dir, name: str, result: dict, text: str, plots=None) -> dict:
    """Write ``name.json`` (``result`` with its provenance), ``name.md`` (``text`` and the provenance line) and the
    plots into ``out_dir`` (created if needed); print the text and the paths; return ``result``.

    ``plots``: None, ``plot(path)`` (writes ``name.png``) or ``{part: plot(path)}`` (writes ``name-part.png``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result["provenance"] = provenance()
    text = with_provenance(text, result)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(result, indent=1, default=str))
    paths[1].write_text(text)
    if callable(plots):
        plots = {"": plots}
    for part, plot in (plots or {}).items():
        paths.append(out / f"{name}{'-' + part if part else ''}.png")
        plot(paths[-1])
    (out / f"{name}.partial.json").unlink(missing_ok=True)
    _RUN.clear()  # the run is over: a next one without ``begin`` starts now
    print(text)
    print("wrote " + ", ".join(map(str, paths)))
    return result
