"""``defuser-quant check CKPT``: is a (quantized) MoE checkpoint fit to serve? Headers and scales only."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``check`` subcommand."""
    parser = subparsers.add_parser(
        "check",
        help="verify a MoE checkpoint's experts before it ships (headers and scales only)",
        description=(
            "Read CKPT's safetensors headers (and only its scale tensors) and verify that every experts block has "
            "every expert in one layout, every expert projection is quantized (or excluded by the config, with the "
            "reason), gate/up, q/k/v and a layer's experts share scheme/bits/group size, scales are finite and "
            "non-zero, names are the family's per-expert names and no fused packed key is stored. "
            "Exit 0: fit; 1: problems (listed by layer/expert/projection); 2: bad input."
        ),
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="local checkpoint directory (config.json + safetensors)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--for", dest="target", choices=("vllm", "transformers"), default="vllm",
                        help="vllm (default): serving engines' per-expert loaders; transformers: also what stock "
                             "Transformers would do with the experts")
    parser.set_defaults(handler=run_check)
    return parser


def run_check(args: argparse.Namespace) -> int:
    """Handler of ``defuser-quant check``; bad input raises ``CheckpointError`` (exit 2 in ``main``)."""
    from ..checkpoint.check import check_checkpoint

    result = check_checkpoint(args.checkpoint, args.target)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(result.summary())
    return 0 if result.fit else 1
