"""``defuser-quant convert SRC DST --to fused|per-expert``: the offline checkpoint converter."""

from __future__ import annotations

import argparse
import json
import sys

from .console import stdout_console


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``convert`` subcommand."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a safetensors checkpoint between per-expert and fused experts (streams, never loads the model)",
        description=(
            "Rewrite the experts of a safetensors checkpoint as fused tensors (experts.gate_up_proj) or per-expert "
            "tensors (experts.{e}.gate_proj.weight), tensor by tensor from memory-mapped shards. SRC is only read; "
            "DST is written through a hidden temporary directory renamed at the end."
        ),
    )
    parser.add_argument("src", help="checkpoint directory (model.safetensors or sharded with an index)")
    parser.add_argument("dst", help="output directory (must not be SRC, inside SRC, or non-empty without --overwrite)")
    parser.add_argument("--to", required=True, choices=("fused", "per-expert"), help="target experts layout")
    parser.add_argument("--max-shard-size", default="5GB", type=_shard_size, help="largest output shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--workers", type=int, default=2, help="shards written at the same time (default 2)")
    parser.add_argument("--no-fsync", action="store_true", help="skip flushing shards to disk before the final rename")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout (no progress bar)")
    parser.set_defaults(handler=run_convert)
    return parser


def _shard_size(text: str) -> str:
    """argparse type: refuse an unreadable size at parse time (exit 2 with the usage line)."""
    from ..checkpoint.errors import CheckpointError
    from ..checkpoint.stream import parse_size

    try:
        parse_size(text)
    except (CheckpointError, ValueError):
        raise argparse.ArgumentTypeError(f"cannot read the size {text!r}; write e.g. 5GB, 500MB or 2GiB") from None
    return text


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]convert"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors {task.fields[gib]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )


def _print_report(report, console) -> None:
    from rich.table import Table

    table = Table(title=f"{report.model_type}: experts blocks -> {report.to}", title_justify="left")
    for name, kwargs in (("block", {"overflow": "fold"}), ("class", {}), ("layout", {}), ("experts", {"justify": "right"}),
                         ("found", {}), ("action", {}), ("tensors", {"justify": "right"}), ("MiB", {"justify": "right"})):
        table.add_column(name, **kwargs)
    for b in report.blocks:
        where = b.path if b.disk_prefix in ("", b.path) else f"{b.path}\n(on disk: {b.disk_prefix})"
        table.add_row(where, b.class_name, b.layout, str(b.num_experts), b.found, b.action,
                      f"{b.tensors_in} -> {b.tensors_out}", f"{b.nbytes / 2**20:.1f}")
    console.print(table)
    console.print(report.summary(), highlight=False)


def run_convert(args: argparse.Namespace) -> int:
    """Handler of ``defuser-quant convert``; a refused conversion raises ``CheckpointError``
    (``main`` prints it and exits with 2)."""
    from rich.console import Console

    from ..checkpoint import convert_checkpoint
    from ..jobs.model_source import load_model_config

    load_model_config(args.src, what="SRC")  # a missing, corrupt or unknown config: one clear line
    out, err = stdout_console(), Console(stderr=True)
    show = not args.json and err.is_terminal
    bar = _progress(err) if show else None
    task = None

    def on_update(update) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task("convert", total=update.total, gib="")
        gib = f"{update.done_bytes / 2**30:.2f}/{update.total_bytes / 2**30:.2f} GiB"
        bar.update(task, completed=update.done, gib=gib)

    try:
        if bar is not None:
            bar.start()
        report = convert_checkpoint(
            args.src, args.dst, to=args.to, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
            fsync=not args.no_fsync, workers=args.workers, progress=on_update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.stop()
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_report(report, out)
    return 0
