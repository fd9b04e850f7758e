"""Command line: ``defuser-quant demo`` (and, as they land, run / convert / inspect)."""

from __future__ import annotations

import argparse
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defuser-quant", description="Defuse fused MoE experts for quantizers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="defuse a tiny MoE, check the math, round-trip it (offline)")
    run = sub.add_parser("run", help="run a job (no config: the embedded default, currently the demo)")
    run.add_argument("config", nargs="?", help="job YAML (not yet supported: omit it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .demo import run_demo

    if args.command == "run" and args.config:
        print("defuser-quant run CONFIG: job files are not supported yet; run without a config for the default job.", file=sys.stderr)
        return 2
    facts = run_demo()
    ok = facts["round_trip_identical"] and facts["saved_reloaded_identical"] and facts["max_abs_diff"] < 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
