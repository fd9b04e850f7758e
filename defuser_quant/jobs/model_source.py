"""Where a job's model comes from, checked before any work: a local model folder or a hub id."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..core.errors import DefuserQuantError

logger = logging.getLogger(__name__)
BUILTIN_MODEL = "builtin:tiny-qwen3-moe"


class ModelSourceError(DefuserQuantError):
    """The model cannot be found or its config cannot be read."""


def resolve_model_path(path: str) -> str:
    """``builtin:tiny-qwen3-moe`` is the small trained model shipped with the package."""
    if path == BUILTIN_MODEL:
        from defuser_quant.assets import TINY_MOE_PATH

        return str(TINY_MOE_PATH)
    if path.startswith("builtin:"):
        raise ModelSourceError(f"unknown builtin model {path!r}; the one shipped is {BUILTIN_MODEL!r}")
    return path


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_model_config(path: str, *, trust_remote_code: bool = False, what: str = "model") -> Any:
    """The model's Transformers config, or ``ModelSourceError`` saying what is wrong and what to do.

    A local path must be a folder with a readable ``config.json`` of a ``model_type`` this
    Transformers knows; anything else is taken as a hub id, tried only when the hub is reachable
    (no minute of retries when it is not).
    """
    from transformers import AutoConfig

    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelSourceError(f"{what} {path} is a file; give the model's folder (the one holding config.json)")
        if not (local / "config.json").is_file():
            raise ModelSourceError(f"{what} {path} has no config.json: not a model folder; give the folder the model was saved to")
    else:
        from defuser_quant.calibration.data import hub_unreachable_reason

        looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
        why = None if looks_local else hub_unreachable_reason()
        if looks_local or why:
            hint = f"; the hub cannot be used ({why})" if why else ""
            raise ModelSourceError(
                f"{what} {path} does not exist as a local folder{hint}; give a local model folder"
                + ("" if looks_local else " or make the hub reachable")
            )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        # corrupt config.json, unknown model_type, unreachable or unknown hub repository
        message = _first_line(exc)
        if "model type" in str(exc) and "does not recognize" in str(exc):
            message += " (upgrade transformers, or set trust_remote_code if the model ships its own code)"
        raise ModelSourceError(f"{what} {path}: cannot read its config: {message}") from exc
