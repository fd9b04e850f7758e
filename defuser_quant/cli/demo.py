"""``defuser-quant demo``: defuse a tiny MoE, check the math, round-trip it (offline, seconds)."""

from __future__ import annotations

import argparse


def _handle(args: argparse.Namespace) -> int:
    from ..tools.demo import run_demo

    facts = run_demo()
    ok = facts["round_trip_identical"] and facts["saved_reloaded_identical"] and facts["max_abs_diff"] < 1e-4
    return 0 if ok else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="defuse a tiny MoE, compare with the fused model, re-fuse, save and reload")
    parser.set_defaults(handler=_handle)
