"""Runs a job: resolve inputs, stage the output, call the backend, report, write ``job.json``."""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from defuser_quant.calibration import distributed

from .backends import get_backend
from .config import JobConfig
from .context import BackendResult, JobContext
from ..checkpoint.check import job_verdict
from .output import check_output_dir, staged_output
from .preflight import preflight
from .quiet import LOG_FILE, terminal_stream, third_party_output

logger = logging.getLogger(__name__)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("defuser-quant", "torch", "transformers", "gptqmodel", "llmcompressor", "compressed-tensors", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class JobReport:
    """What a finished job did: written to ``job.json`` and shown as the summary table."""

    output_dir: str
    timings: dict[str, float] = field(default_factory=dict)
    result: BackendResult = field(default_factory=BackendResult)
    heatmap: str | None = None
    log_file: str | None = None  # where the quantizers' own output went
    check: dict[str, Any] | None = None  # ``defuser-quant check`` of the written checkpoint

    def to_dict(self, config: JobConfig) -> dict[str, Any]:
        r = self.result
        return {
            "schema_version": 1,
            "versions": _versions(),
            "config": config.model_dump(mode="json"),
            "output_dir": self.output_dir,
            "timings_s": self.timings,
            "perplexity": {"before": r.ppl_before, "after": r.ppl_after},
            "experts": {"projections": r.expert_projections, "quantized": r.expert_projections_quantized},
            "coverage": None if r.coverage is None else {
                "min_tokens": r.coverage.min_tokens,
                "experts_under_threshold": len(r.coverage.under_threshold),
                "report": "coverage.json",
                "heatmap": self.heatmap,
            },
            "extra_outputs": r.extra_outputs,
            "check": self.check,
            "notes": r.notes,
        }


def _summary(report: JobReport, config: JobConfig) -> Table:
    r = report.result
    table = Table(title="defuser-quant job summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    q = config.quantization
    table.add_row("model", config.model.path)
    table.add_row("backend / method / scheme", f"{q.backend} / {q.method} / {q.scheme}")
    table.add_row("routing", f"{config.calibration.routing} (min_tokens {config.calibration.min_tokens}, policy {config.calibration.policy})")
    table.add_row("expert projections quantized", f"{r.expert_projections_quantized} / {r.expert_projections}")
    if r.coverage is not None:
        table.add_row("experts under min_tokens", str(len(r.coverage.under_threshold)))
    if r.ppl_before is not None:
        change = f" ({100 * (r.ppl_after / r.ppl_before - 1):+.2f}%)" if r.ppl_after else ""
        table.add_row("held-out perplexity", f"{r.ppl_before:.3f} -> {r.ppl_after:.3f}{change}" if r.ppl_after else f"{r.ppl_before:.3f}")
    if report.check is not None:
        c = report.check
        verdict = "not run: " + c.get("error", "") if c["fit"] is None else "fit to serve" if c["fit"] else (
            f"NOT fit: {c['problems_total']} problem(s), see job.json")
        table.add_row(f"checkpoint check (--for {c['target']})", verdict)
    for stage, seconds in report.timings.items():
        table.add_row(f"time: {stage}", f"{seconds:.1f} s")
    return table


def _print_summary(console: Console, report: JobReport, config: JobConfig) -> None:
    """The summary table, then the output paths on lines of their own: a table cell would break a
    long path over several lines, and a path is there to be copied."""
    console.print(_summary(report, config))
    console.print(f"output: {report.output_dir}", soft_wrap=True, highlight=False, markup=False)
    if report.log_file:
        console.print(f"quantizer logs: {report.log_file}", soft_wrap=True, highlight=False, markup=False)


def _draw_heatmap(coverage: Any, path: Path, notes: list[str]) -> str | None:
    """The picture is best effort: a failure is a warning in the report, never a lost result."""
    try:
        coverage.heatmap(path)
    except Exception as exc:  # noqa: BLE001 - any plotting failure; the numbers are in coverage.json
        if path.is_file():
            path.unlink()  # a half-written picture
        note = f"coverage.png was not drawn ({type(exc).__name__}: {exc}); the numbers are in coverage.json"
        logger.warning("%s", note)
        notes.append(note)
        return None
    return path.name


@contextlib.contextmanager
def _output(target: Path, overwrite: bool, protected: list[Path], main: bool) -> Iterator[Path]:
    """The staging folder; under torchrun the other ranks check the same target (so they fail
    alike, before any work) and write into a scratch folder that is removed."""
    if main:
        with staged_output(target, overwrite, protected) as staging:
            yield staging
        return
    check_output_dir(target, overwrite, protected)
    with tempfile.TemporaryDirectory(prefix="defuser-quant-rank-") as scratch:
        yield Path(scratch)


def _decoder_layers(model: Any) -> list[Any]:
    """The model's decoder layers: the longest ``nn.ModuleList`` named ``layers`` (or ``h``, ``blocks``)."""
    best: list[Any] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            if len(module) > len(best):
                best = list(module)
    return best


def run_job(config: JobConfig, console: Console | None = None, *, verbose: bool = False) -> JobReport:
    """Run ``config`` end to end; the output folder appears only when everything succeeded.

    Unless ``verbose``, what the quantizers print goes to ``<output>/logs/quantizer.log`` and
    the terminal shows our stages (per-layer progress with an ETA in the long one) and the summary.
    """
    from transformers import AutoTokenizer

    from defuser_quant.calibration.data import build_calibration_batches, build_calibration_samples
    from defuser_quant.calibration.grouped import deterministic_mode

    from .evaluate import perplexity

    main = distributed.is_main_process()  # under torchrun only rank 0 writes and prints
    owns_terminal = console is None and main  # then the quantizers' output is redirected to the log
    terminal = terminal_stream() if owns_terminal and not verbose else None
    if console is None and terminal is not None:
        # piped: wide enough for module paths rather than the 80 columns rich assumes
        console = Console(file=terminal, width=None if terminal.isatty() else 160)
    console = console or Console(quiet=not main)
    checks = preflight(config)
    model_path = checks.model_path
    torch.manual_seed(config.calibration.data.seed)  # anything random below starts from the job's seed
    target = Path(config.output.dir).resolve()
    protected = [Path(model_path)] if Path(model_path).exists() else []
    report = JobReport(output_dir=str(target))

    progress = Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )

    current: list[Any] = []  # the running stage's task

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        task = progress.add_task(name, total=1, unit="")
        current.append(task)
        start = time.perf_counter()
        yield
        report.timings[name] = time.perf_counter() - start
        current.pop()
        total = next(t.total for t in progress.tasks if t.id == task)
        progress.update(task, completed=total)

    @contextlib.contextmanager
    def track_layers(model: Any) -> Iterator[None]:
        """Per-layer progress (and so an ETA) for the running stage: layer i starting means i done."""
        layers = _decoder_layers(model)
        if not layers or not current:
            yield
            return
        task = current[-1]
        progress.update(task, total=len(layers), completed=0, unit=f"0/{len(layers)} layers")
        done = [0]

        def entered(index: int, *_: Any) -> None:
            if index > done[0]:
                done[0] = index
                progress.update(task, completed=index, unit=f"{index}/{len(layers)} layers")

        handles = [layer.register_forward_pre_hook(lambda *a, i=i: entered(i, *a)) for i, layer in enumerate(layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            progress.update(task, unit=f"{len(layers)}/{len(layers)} layers")

    with _output(target, config.output.overwrite, protected, main) as staging, third_party_output(
        staging / LOG_FILE, terminal, enabled=owns_terminal and (verbose or terminal is not None), echo=verbose
    ) as log_file, progress:
        if log_file is not None:
            report.log_file = str(target / LOG_FILE)
        with stage("tokenize data"):
            tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
            samples = build_calibration_samples(config.calibration.data, tokenizer)
            eval_batches = (
                build_calibration_batches(config.evaluation.data, tokenizer) if config.evaluation.enabled else []
            )

        def evaluate(model: Any) -> float | None:
            return perplexity(model, eval_batches) if eval_batches else None

        ctx = JobContext(
            config, model_path, tokenizer, samples, staging, stage, evaluate, output_dir=target, track_layers=track_layers
        )
        with deterministic_mode(config.calibration.deterministic):
            report.result = get_backend(config.quantization.backend).run(ctx)
        report.result.notes[:0] = checks.notes
        if report.result.coverage is not None:
            report.result.coverage.to_json(staging / "coverage.json")
            if checks.can_plot:
                report.heatmap = _draw_heatmap(report.result.coverage, staging / "coverage.png", report.result.notes)
            console.print(report.result.coverage.console_summary())
        report.check = job_verdict(staging)
        (staging / "job.json").write_text(json.dumps(report.to_dict(config), indent=2))
    _print_summary(console, report, config)
    return report
