"""Command line entry point: ``defuser-quant run|demo|convert|inspect``.

Each subcommand lives in its own module of this package exposing ``add_parser(subparsers)``,
which registers the parser and sets ``handler`` (``args -> exit code``).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import traceback

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
        return _fail(args, str(exc))
    except KeyboardInterrupt:
        return _fail(args, "interrupted, nothing written", code=130)
    except BrokenPipeError:
        # the reader went away (``--json | head``): nothing more to say, and nowhere to say it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:
        return _fail(args, _os_error(exc))


def _fail(args: argparse.Namespace, message: str, code: int = 2) -> int:
    """One ``defuser-quant <command>: error: ...`` line; the traceback only with ``-v``."""
    if args.verbose:
        traceback.print_exc()
    print(f"defuser-quant {args.command}: error: {message}", file=sys.stderr)
    return code


def _os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return f"{exc.strerror}{where}; nothing written (the partial output was removed): free space or choose another place"
    return f"{exc.strerror or exc}{where}"


if __name__ == "__main__":
    raise SystemExit(main())
