"""GPTQModel's per-module log lines through LogBar: what one line costs, with and without a progress bar.

At the end of ``quantize()`` GPTQModel 7.6 logs every module's record once more
(``ModuleLooper``: ``for module_log in reverse_p.log: log.info(module_log)``), 776 lines at the
two-layer Qwen3-30B-A3B shape, while its finalize progress bar is on screen; on an H200 host that
took 0.3-0.5 s of the run's tail (round 27's sampled tail). Each LogBar line reads the terminal's
state, clears the progress stack, prints and flushes, then draws the stack again.

Each setting runs in a child process whose stdout goes to a file (as in a benchmark or CI log):
``--lines`` records like GPTQModel's, under ``--bars`` progress bars (0: none), timed ``--repeats``
times; one more run under ``cProfile`` splits a line's time into reading the terminal's state
(``_current_render_backend_state``), drawing the progress stack again (``_render_progress_stack_locked``)
and printing (``_print``), as shares of ``LogBar._process`` (cProfile's own overhead included).
``--modes stock,lean``: ``lean`` runs the lines inside the LogBar parts of the plugin's lean
bookkeeping (``overhead.lean_logbar``: the notebook check and the headless check answered from a
memo, bar draws rate-limited, the stack redrawn after lines at most every 0.1 s), as
``quantize_with_defuser`` runs GPTQModel; ``lean-noline`` the same parts but the last (``line_redraw``).

    python benchmarks/log_lines.py --output benchmarks/results/log_lines_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _args import counts
from _report import write_json

#: One module's record as GPTQModel's GPTQ processor logs it (the values only shape the line's width).
RECORD = {"process": "gptq", "layer": 1, "module": "mlp.experts.17.down_proj", "feat: in, out": "768, 2048",
          "dtype: size": "bf16: 3.0MB", "samples": "4096", "loss": "0.0000123", "damp": "0.05000", "time": "0.012",
          "fwd_time": "0.100", "(v)ram": "cuda:0 8.1G", "dynamic": None}
#: ``--modes``: LogBar as it is, inside the plugin's LogBar parts, or inside all of them but ``line_redraw``.
MODES = ("stock", "lean", "lean-noline")
#: The LogBar parts of the lean bookkeeping each mode uses.
LOGBAR_PARTS = {"stock": set(), "lean": {"progress", "draw_rate", "headless", "line_redraw"},
                "lean-noline": {"progress", "draw_rate", "headless"}}
#: LogBar functions whose share of a line is reported (cumulative time under cProfile).
SPLIT = {"terminal_state": "_current_render_backend_state", "stack_redraw": "_render_progress_stack_locked",
         "print": "_print"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=776, help="log lines per timed run (default: the two-layer run's 776)")
    p.add_argument("--bars", type=counts(0), default=[0, 1], help="comma-separated progress-bar counts to run under")
    p.add_argument("--modes", default="stock,lean", help="comma-separated: stock (LogBar as it is), lean (inside "
                   "the plugin's LogBar parts), lean-noline (all of them but line_redraw)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--label", default="", help="free text stored in the JSON (e.g. the commit)")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # child: this many bars
    p.add_argument("--mode", default="stock", help=argparse.SUPPRESS)  # child: one of MODES
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.lines < 1 or args.repeats < 1:
        p.error(f"--lines and --repeats must be at least 1 (got --lines {args.lines}, --repeats {args.repeats})")
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.modes if m not in MODES] + ([args.mode] if args.mode not in MODES else [])
    if unknown or not args.modes:
        p.error(f"--modes takes a comma-separated subset of {', '.join(MODES)}; got {unknown or 'nothing'}")
    return args


def _log_lines(lines: int, bars: int, mode: str = "stock", profile: Any = None) -> float:
    """Seconds for ``lines`` records through GPTQModel's LogBar logger with ``bars`` bars on screen
    (``mode`` "lean"/"lean-noline": inside those LogBar parts of the plugin, :data:`LOGBAR_PARTS`);
    ``profile`` (a ``cProfile.Profile``) is on for the lines only, not for drawing or closing the bars."""
    if LOGBAR_PARTS[mode]:
        from _source import use_source_checkout

        use_source_checkout()
        from defuser_quant.integrations.gptqmodel.overhead import BookkeepingStats, internals_mismatch, lean_logbar

        parts = LOGBAR_PARTS[mode] - set(internals_mismatch())
        with lean_logbar(parts, BookkeepingStats()):
            return _log_lines(lines, bars, profile=profile)
    from gptqmodel.utils.logger import setup_logger

    log = setup_logger()
    shown = []
    for i in range(bars):
        pb = log.pb(range(10)).manual().set(show_left_steps=False)
        pb.title(f"bar {i}").draw(force=True)
        shown.append(pb)
    if profile is not None:
        profile.enable()
    t0 = time.perf_counter()
    for _ in range(lines):
        log.info(RECORD)
    seconds = time.perf_counter() - t0
    if profile is not None:
        profile.disable()
    for pb in shown:
        pb.close()
    return seconds


def worker(args: argparse.Namespace) -> dict:
    if not args.profile:
        return {"seconds": _log_lines(args.lines, args.worker, args.mode)}
    import cProfile
    import pstats

    profile = cProfile.Profile()
    _log_lines(args.lines, args.worker, args.mode, profile)
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, ..., tottime, cumtime, callers)
    cumulative = {}
    for (_, _, name), entry in stats.items():
        cumulative[name] = cumulative.get(name, 0.0) + entry[3]
    total = cumulative.get("_process", 0.0)
    return {"profiled_seconds": round(total, 4),
            "shares": {key: round(cumulative.get(fn, 0.0) / total, 3) if total else None for key, fn in SPLIT.items()}}


def _child(args: argparse.Namespace, bars: int, mode: str, profile: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(bars), "--lines", str(args.lines),
           "--mode", mode]
    with tempfile.TemporaryFile() as out:  # LogBar writes to stdout: a file, as in a benchmark's log
        proc = subprocess.run(cmd + (["--profile"] if profile else []), stdout=out, stderr=subprocess.PIPE, text=True,
                              timeout=600)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        raise SystemExit(f"log_lines.py child ({mode}, {bars} bars) failed: {proc.stderr.strip().splitlines()[-1:]}")
    return {**json.loads(proc.stderr.strip().splitlines()[-1]), "stdout_bytes": len(text.encode("utf-8", "replace")),
            "record_lines": sum(RECORD["module"] in line for line in text.splitlines())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)), file=sys.stderr)
        return 0
    rows = []
    for mode, bars in ((m, b) for m in args.modes for b in args.bars):
        runs = [_child(args, bars, mode, profile=False) for _ in range(args.repeats)]
        seconds = statistics.median(r["seconds"] for r in runs)
        profiled = _child(args, bars, mode, profile=True)
        rows.append({"mode": mode, "bars": bars, "lines": args.lines, "seconds": [round(r["seconds"], 4) for r in runs],
                     "median_s": round(seconds, 4), "per_line_ms": round(seconds / args.lines * 1000, 3),
                     "stdout_bytes": runs[0]["stdout_bytes"], "record_lines": runs[0]["record_lines"],
                     "profiled_seconds": profiled["profiled_seconds"],
                     "shares_of_a_line": profiled["shares"]})
        print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/log_lines.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"meta": {"command": command, "label": args.label, "platform": platform.platform(),
                        "python": platform.python_version()}, "rows": rows}
    if args.output is not None:
        write_json(args.output, payload)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
