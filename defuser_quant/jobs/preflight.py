"""Checks a job makes before any work, so a result never dies at its last step."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import DefuserQuantError
from ..core.model_config import text_config
from .config import JobConfig
from .model_source import load_model_config, resolve_model_path

logger = logging.getLogger(__name__)

#: backend name -> (import name, pip extra)
BACKEND_PACKAGES = {"gptqmodel": ("gptqmodel", "gptqmodel"), "llmcompressor": ("llmcompressor", "llmcompressor")}


class PreflightError(DefuserQuantError):
    """The job cannot run as configured (a missing package, an unusable device)."""


@dataclass
class Preflight:
    """What the checks found: the resolved model path, its config, and warnings for the report."""

    model_path: str
    model_config: Any
    can_plot: bool
    notes: list[str] = field(default_factory=list)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _check_device(device: str) -> None:
    import torch

    kind = torch.device(device)
    if kind.type == "cpu":
        return
    backend = getattr(torch, kind.type, None)
    if backend is None or not backend.is_available():
        raise PreflightError(f"model.device is {device!r} but no {kind.type} device is available here; use device: cpu")
    if kind.index is not None and kind.index >= backend.device_count():
        raise PreflightError(
            f"model.device is {device!r} but only {backend.device_count()} {kind.type} device(s) exist here"
        )


def _max_positions(model_config: Any) -> int | None:
    value = getattr(text_config(model_config), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def _check_moe(model_config: Any, path: str) -> None:
    """The gptqmodel backend calibrates experts: a model without experts blocks is pointed elsewhere."""
    from defuser_quant.checkpoint.meta import build_meta_model
    from defuser_quant.core.discovery import find_fused_blocks

    try:
        model = build_meta_model(model_config)
    except Exception as exc:  # noqa: BLE001 - the structure check is advisory; loading will say more
        logger.debug("could not build %s on meta to look for experts: %s", path, exc)
        return
    if not find_fused_blocks(model, dense=False):
        raise PreflightError(
            f"model.path {path} ({type(model).__name__}) has no Mixture-of-Experts blocks, so there is nothing to "
            "defuse or calibrate per expert: quantize a dense model with GPTQModel itself "
            "(GPTQModel.load(path, QuantizeConfig(...)).quantize(...)), or use backend: llmcompressor"
        )


def preflight(config: JobConfig) -> Preflight:
    """Run every check; raises ``DefuserQuantError`` subclasses naming what to fix."""
    backend = config.quantization.backend
    module, extra = BACKEND_PACKAGES[backend]
    if not _installed(module):
        raise PreflightError(
            f"backend {backend!r} needs the {module} package, which is not installed; "
            f"pip install 'defuser-quant[{extra}]' or choose the other backend"
        )
    _check_device(config.model.device)
    model_path = resolve_model_path(config.model.path)
    model_config = load_model_config(model_path, trust_remote_code=config.model.trust_remote_code, what="model.path")
    if backend == "gptqmodel":
        _check_moe(model_config, config.model.path)
    notes: list[str] = []
    limit = _max_positions(model_config)
    for name, data in (("calibration.data", config.calibration.data), ("evaluation.data", config.evaluation.data)):
        if name.startswith("evaluation") and not config.evaluation.enabled:
            continue
        if limit is not None and data.seq_len > limit:
            notes.append(
                f"{name}.seq_len {data.seq_len} is above the model's max_position_embeddings {limit}: "
                "positions past it are outside what the model was trained on"
            )
    can_plot = _installed("matplotlib")
    if not can_plot:
        notes.append("coverage.png is not drawn: matplotlib is not installed (pip install matplotlib)")
    for note in notes:
        logger.warning("%s", note)
    return Preflight(model_path, model_config, can_plot, notes)
