"""``defuser-quant run [CONFIG]``: a whole calibration/quantization job from a YAML file."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

DEFAULT_JOB = Path(__file__).resolve().parents[1] / "jobs" / "default.yaml"


def _parse_set(values: list[str]) -> tuple[dict, dict]:
    """``--set KEY=VALUE`` items as (overrides, where each came from)."""
    from ..jobs.config import JobConfigError

    out, sources = {}, {}
    for item in values:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise JobConfigError(f"--set expects KEY=VALUE (dotted keys, YAML values), got {item!r}")
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise JobConfigError(f"--set {item}: the value is not valid YAML: {exc}") from None
        sources[key] = f"--set {item}"
    return out, sources


def _handle(args: argparse.Namespace) -> int:
    from ..jobs.config import load_job_config
    from ..jobs.runner import run_job

    overrides, sources = _parse_set(args.set)
    if args.output:
        overrides["output.dir"], sources["output.dir"] = args.output, "--output"
    if args.overwrite:
        overrides["output.overwrite"], sources["output.overwrite"] = True, "--overwrite"
    config = load_job_config(args.config or DEFAULT_JOB, overrides, sources)
    from ..calibration.distributed import launched_by_torchrun
    from .multiprocess import check_job, launch, process_group, run_argv

    check_job(config, args.nproc)
    if args.nproc > 1 and not launched_by_torchrun():
        return launch(args.nproc, run_argv(args))
    with process_group(config):
        run_job(config, verbose=args.verbose)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="run a calibration/quantization job (no CONFIG: the embedded default, offline)",
        description="Run a job described by a YAML file. Without CONFIG, runs the embedded default "
        "(configs/default.yaml): GPTQ W4A16 of the tiny MoE shipped with the package, offline.",
    )
    parser.add_argument("config", nargs="?", help="job YAML (default: the embedded default job)")
    parser.add_argument("-o", "--output", help="output folder (overrides output.dir)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. --set quantization.scheme=W8A16")
    parser.add_argument(
        "--nproc", type=int, default=1, metavar="N",
        help="spread the job over N processes with torchrun (llmcompressor backend; one GPU each on GPUs, gloo on the CPU)",
    )
    parser.set_defaults(handler=_handle)
