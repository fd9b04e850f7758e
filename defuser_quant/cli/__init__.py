"""Command line entry point: ``defuser-quant run|demo|convert|inspect``.

Each subcommand lives in its own module of this package exposing ``add_parser(subparsers)``,
which registers the parser and sets ``handler`` (``args -> exit code``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..core.errors import DefuserQuantError

SUBCOMMAND_MODULES = ["run", "demo", "convert", "inspect", "check"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defuser-quant", description="Defuse fused MoE experts for quantizers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    return parser


# Import-time warnings of optional third-party kernels (torchao, pulled in by gptqmodel: missing
# CUDA extensions on CPU machines; torch's pytree deprecation notice) that say nothing about the job.
IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree", "torch.fx._symbolic_trace")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        for name in IMPORT_NOISE_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        # llm-compressor logs every quantized module through loguru (INFO and METRIC lines), and
        # warns about its own MoE linearization, which our modifier has taken over; -v shows all.
        os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    try:
        return int(args.handler(args) or 0)
    except DefuserQuantError as exc:  # our errors already say what is wrong and what to do
        print(f"defuser-quant {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
