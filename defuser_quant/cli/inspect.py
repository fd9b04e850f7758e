"""``defuser-quant inspect MODEL``: fused experts blocks and what defuser-quant would do."""

from __future__ import annotations

import argparse
import json
import sys

from .console import stdout_console


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``inspect`` subcommand."""
    parser = subparsers.add_parser(
        "inspect",
        help="list fused experts blocks, layouts and expert sizes (meta device, no weights loaded)",
        description=(
            "Build MODEL on the meta device from its config (no weights) and list its fused experts blocks: "
            "layout, experts, per-expert names, what convert_model / replace_fused_blocks would do, and expert "
            "parameter counts against the whole model. For a local checkpoint, also how each block is stored."
        ),
    )
    parser.add_argument("model", help="local model directory, or a hub id when the hub is reachable")
    parser.add_argument("--filter", action="append", default=None, metavar="RULE",
                        help="convert_model filter rule (+:regex include, -:regex exclude); repeatable")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run_inspect)
    return parser


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _print(result, console) -> None:
    from rich.table import Table

    console.print(f"[bold]{result.model}[/bold]: {result.architecture} ({result.model_type}, {result.dtype})", highlight=False)
    console.print(
        f"parameters {_count(result.total_params)} ({_size(result.total_bytes)}); experts {_count(result.expert_params)} "
        f"({_size(result.expert_bytes)}, {result.expert_fraction:.1%} of the model) in {len(result.blocks)} fused block(s)",
        highlight=False,
    )
    table = Table(show_lines=False)
    for name, kwargs in (("block", {"overflow": "fold"}), ("class", {}), ("layout", {}), ("experts", {"justify": "right"}),
                         ("per-expert Linears", {}), ("params", {"justify": "right"}), ("on disk", {})):
        table.add_column(name, **kwargs)
    for b in result.blocks:
        linears = ", ".join(f"{lin.name} {lin.shape[0]}x{lin.shape[1]}{'+b' if lin.bias else ''}" for lin in b.per_expert)
        table.add_row(b.path, b.class_name, b.layout, str(b.num_experts), linears, _count(b.expert_params), b.on_disk or "-")
    console.print(table)
    actions = sorted({b.convert_model for b in result.blocks})
    for action in actions:
        n = sum(b.convert_model == action for b in result.blocks)
        console.print(f"convert_model: {n} block(s) -> {action}", highlight=False)
    patch = result.replace_fused_blocks
    verdict = f"patches {', '.join(patch['classes'])}" if patch["patchable"] else "not patchable"
    console.print(f"replace_fused_blocks({patch['model_type']!r}): {verdict}; {patch['note']}", highlight=False)
    console.print(f"saving: {result.saving}", highlight=False)
    if result.checkpoint:
        ck = result.checkpoint
        if "note" in ck:
            console.print(f"checkpoint: {ck['note']}", highlight=False)
        else:
            console.print(
                f"checkpoint: {ck['files']} shard(s), {ck['tensors']} tensors, {_size(ck['bytes'])}, "
                f"experts stored {ck['format']}",
                highlight=False,
            )
            for to, what in ck["convert"].items():
                console.print(f"  convert --to {to}: {what}", highlight=False)


def run_inspect(args: argparse.Namespace) -> int:
    """Handler of ``defuser-quant inspect``; an uninspectable model raises ``DefuserQuantError``
    (``main`` prints it and exits with 2)."""
    from ..jobs.model_source import load_model_config
    from ..tools.inspect_model import inspect_model

    load_model_config(args.model, what="MODEL")  # a missing, corrupt or unknown config: one clear line
    result = inspect_model(args.model, filter=args.filter)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print(result, stdout_console())
    return 0
