"""Every committed two-layer GPU call of both backends, tallied against the issue's 4x.

The README's "over 4x in N of M runs" lines were counted by hand from many result files; this
counts them from the files. It reads each plain two-layer call (no profiler or sampler attached:
``*_sampled``, ``*_stages``, ``*gil*`` and the like are left out, their timings are not the
run's own) of

* GPTQModel (``gptqmodel_cuda_2layers_roundN[x][_kind].json``): the plugin's default variant
  ``ours-grouped-batched`` against ``stock``, ``total_s`` (end to end without imports), the run
  ``X#k`` paired with ``stock#k``;
* llm-compressor (``distributed_cuda_roundN[x][_kind].json``): ``all`` against ``stock``, both on
  one process, ``oneshot_s``, paired by ``repeat``.

Each call gives its own-round pairs (stock's seconds / ours', the turns run back to back, so
both saw the same host) and every ours run against every stock run (min / median / max, as the
README quotes). Each window counts the pairs at 4x or more from a round on (rounds 47, 55 and
60). The default variant of each call is whatever the plugin's defaults were in that round.

    python benchmarks/ratio_tally.py                   # writes benchmarks/results/ratio_tally.json
    python benchmarks/ratio_tally.py --check           # exit 1 if the committed tally is stale
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import write_text  # noqa: E402

RESULTS = HERE / "results"
TALLY = RESULTS / "ratio_tally.json"
TARGET = 4.0
COMMAND = "python benchmarks/ratio_tally.py"  # recorded in the tally: how it was made, and how a tally is known

# backend -> (file pattern, ours' variant, seconds key); a call's name is ``roundN`` plus an
# optional letter and the device kind, nothing else (other suffixes mark instrumented calls).
BACKENDS: dict[str, tuple[re.Pattern[str], str, str]] = {
    "gptqmodel": (re.compile(r"gptqmodel_cuda_2layers_round(\d+)([a-z]?)(?:_h[12]00x\d)?\.json"),
                  "ours-grouped-batched", "total_s"),
    "llmcompressor": (re.compile(r"distributed_cuda_round(\d+)([a-z]?)(?:_h[12]00x\d)?\.json"),
                      "all", "oneshot_s"),
}
WINDOWS = (47, 55, 60)  # rounds from which the pairs are counted: 47 brought llm-compressor's stacked save
# packing, GPTQModel's default first ran at about 8-9 s a run on an H100 in round 48


def _turn(row: dict[str, Any]) -> int:
    """Which turn of the call a row ran in (0 for the first)."""
    if row.get("repeat") is not None:
        return int(row["repeat"])
    run = str(row.get("run") or "")
    return int(run.rsplit("#", 1)[1]) - 1 if "#" in run else 0


def _times(rows: list[dict[str, Any]], variant: str, key: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for row in rows:
        if row.get("variant") != variant or row.get("nproc", 1) not in (1, None):
            continue
        seconds = row.get(key)
        if isinstance(seconds, (int, float)) and seconds > 0:
            out[_turn(row)] = float(seconds)
    return out


def _spread(values: list[float]) -> list[float] | None:
    return [round(min(values), 2), round(statistics.median(values), 2), round(max(values), 2)] if values else None


def tally_call(path: Path, backend: str, round_: int) -> dict[str, Any] | None:
    """One call (round ``round_``): its own-round pairs and cross ratios; None when it has no stock and ours run."""
    _, variant, key = BACKENDS[backend]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path.name}: not JSON ({err}); a result file cut short? fix or remove it") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path.name}: no 'rows' list; is it a {backend} two-layer result?")
    ours, stock = _times(rows, variant, key), _times(rows, "stock", key)
    if not ours or not stock:
        return None
    pairs = [{"turn": t, "stock_s": stock[t], "ours_s": ours[t], "ratio": round(stock[t] / ours[t], 2)}
             for t in sorted(ours.keys() & stock.keys())]
    cross = [s / o for s in stock.values() for o in ours.values()]
    meta = data.get("meta") or {}
    return {
        "file": path.name,
        "round": round_,
        "gpu": data.get("gpu") or meta.get("gpu"),
        "pairs": pairs,
        "every_stock_run": _spread(cross),
    }


def window(calls: list[dict[str, Any]], since: int) -> dict[str, Any]:
    """The own-round pairs of the calls from round ``since`` on: how many reach the target."""
    ratios = [p["ratio"] for c in calls if c["round"] >= since for p in c["pairs"]]
    return {
        "since_round": since,
        "calls": sum(1 for c in calls if c["round"] >= since),
        "pairs": len(ratios),
        "at_least_4x": sum(r >= TARGET for r in ratios),
        "ratio": _spread(ratios),
    }


def tally(results: Path = RESULTS, windows: tuple[int, ...] = WINDOWS) -> dict[str, Any]:
    """Both backends' calls in ``results``, oldest round first, with their windows."""
    out: dict[str, Any] = {"target": TARGET, "command": COMMAND}
    for backend, (pattern, variant, key) in BACKENDS.items():
        named = [(p, m) for p in sorted(results.iterdir()) for m in [pattern.fullmatch(p.name)] if m]
        calls = [c for p, m in named for c in [tally_call(p, backend, int(m.group(1)))] if c is not None]
        calls.sort(key=lambda c: (c["round"], c["file"]))
        out[backend] = {"ours": variant, "seconds": key, "windows": [window(calls, since) for since in windows],
                        "calls": calls}
    return out


def _is_tally(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("command") == COMMAND and set(BACKENDS) <= set(data)


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of result files (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None, help=f"the tally's path (default: {TALLY.relative_to(HERE.parent)} "
                   "for the committed results)")
    p.add_argument("--check", action="store_true", help="compare with the committed tally instead of writing it")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        p.error(f"--results {args.results}: not a folder of result files")
    output = args.output or (TALLY if args.results.resolve() == RESULTS.resolve() else args.results / TALLY.name)
    try:
        data = tally(args.results)
    except ValueError as err:
        p.error(str(err))
    text = render(data)
    if args.check:
        if not output.is_file() or output.read_text(encoding="utf-8") != text:
            print(f"{output}: stale or missing; run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if output.exists() and not _is_tally(output):
        p.error(f"--output {output}: exists and is not a tally this script wrote; name a new file")
    write_text(output, text)
    for backend in BACKENDS:
        for w in data[backend]["windows"]:
            print(f"{backend}: {w['at_least_4x']} of {w['pairs']} own-round pairs at least {TARGET:g}x since round "
                  f"{w['since_round']} ({w['calls']} calls; min / median / max {w['ratio']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
