"""``defuser-quant run --nproc N``: one job spread over N processes by ``torchrun``.

Only the llm-compressor backend runs distributed (its ``oneshot`` splits the calibration data
over the ranks and reduces GPTQ Hessians; ``DefuseModifier`` sums the token counts). Every
process runs the same job; rank 0 writes the output folder. The launcher re-runs this command
line as ``python -m torch.distributed.run --standalone --nproc-per-node N -m defuser_quant run ...``;
the same job can be started by hand with ``torchrun --nproc-per-node N -m defuser_quant run JOB``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from ..calibration import distributed
from ..core.errors import DefuserQuantError

logger = logging.getLogger(__name__)


class MultiprocessError(DefuserQuantError, ValueError):
    """The job cannot be spread over several processes as asked."""


def check_job(config: Any, nproc: int) -> None:
    """Refuse, before anything starts, a job that cannot run in ``nproc`` processes."""
    if nproc < 1:
        raise MultiprocessError(f"--nproc must be at least 1, got {nproc}")
    backend = config.quantization.backend
    if nproc > 1 and backend != "llmcompressor":
        raise MultiprocessError(
            f"quantization.backend {backend!r} does not run under torchrun (--nproc {nproc}): only the llmcompressor "
            "backend spreads calibration over processes. Run without --nproc, or set quantization.backend: llmcompressor"
        )
    if nproc > 1 and str(config.model.device).startswith("cuda"):
        import torch

        if torch.cuda.device_count() < nproc:
            raise MultiprocessError(
                f"--nproc {nproc} needs one GPU per process, {torch.cuda.device_count()} visible; lower --nproc"
            )


def run_argv(args: argparse.Namespace) -> list[str]:
    """The ``defuser_quant`` command line of ``args`` without ``--nproc`` (keep in sync with ``run.add_parser``)."""
    argv = ["-v"] if getattr(args, "verbose", False) else []
    argv.append("run")
    if args.config:
        argv.append(str(args.config))
    if args.output:
        argv += ["--output", str(args.output)]
    if args.overwrite:
        argv.append("--overwrite")
    for item in args.set:
        argv += ["--set", item]
    return argv


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m defuser_quant <argv>`` in ``nproc`` processes under torchrun; its exit code."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "defuser_quant", *argv,
    ]
    logger.info("launching: %s", " ".join(command))
    return subprocess.call(command)


@contextlib.contextmanager
def process_group(config: Any) -> Iterator[None]:
    """Inside a process torchrun started: join the process group for the job (no-op otherwise)."""
    if not distributed.launched_by_torchrun():
        yield
        return
    check_job(config, distributed.int_env("WORLD_SIZE"))
    backend = "nccl" if str(config.model.device).startswith("cuda") else "gloo"
    joined = distributed.init_from_env(backend)
    try:
        yield
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()
