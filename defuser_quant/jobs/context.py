"""What a backend gets from the runner and gives back."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import JobConfig


@dataclass
class JobContext:
    """Everything a backend needs: the validated config, inputs, and where to write."""

    config: JobConfig
    model_path: str
    tokenizer: Any
    calibration_samples: list[torch.Tensor]
    staging_dir: Path
    stage: Callable[[str], Any]  # context manager factory: ``with ctx.stage("quantize"): ...``
    evaluate: Callable[[Any], float | None]  # perplexity of a model on the held-out batches
    output_dir: Path | None = None  # where staging_dir will be renamed to
    # ``with ctx.track_layers(model):`` per-layer progress for the running stage
    track_layers: Callable[[Any], Any] = lambda model: contextlib.nullcontext()


@dataclass
class BackendResult:
    """What a backend reports back to the runner."""

    ppl_before: float | None = None
    ppl_after: float | None = None
    coverage: Any = None  # CoverageReport
    expert_projections: int = 0
    expert_projections_quantized: int = 0
    extra_outputs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
