"""Refuse a ``from_pretrained`` that leaves defused expert tensors unloaded.

Transformers only logs a load report when checkpoint keys do not map: a defused model would run
with randomly initialised experts. While a pre-load patch is installed, ``install()`` wraps
``PreTrainedModel._finalize_model_loading`` (where Transformers builds that report) so that any
missing, unexpected or mismatched key of an expert block raises ``ExpertLoadError`` naming the keys.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from torch import nn

from . import accelerate_load  # noqa: F401  registers accelerate's fused-checkpoint reader (convert before load)
from .defused import DefusedExperts
from .errors import DefuserQuantError

_EXPERT_SEGMENT = re.compile(r"(^|\.)experts(\.|$)")
_SHOWN = 8


class ExpertLoadError(DefuserQuantError):
    """A checkpoint's expert tensors did not load into the defused experts (they would be random)."""


def expert_block_paths(model: nn.Module) -> list[str]:
    """Module paths of the defused expert blocks of ``model``."""
    return [name for name, module in model.named_modules() if isinstance(module, DefusedExperts)]


def expert_load_problems(model: nn.Module, loading_info: Any) -> dict[str, list[str]]:
    """Missing/unexpected/mismatched keys of ``loading_info`` that concern ``model``'s expert blocks.

    A missing or mismatched key concerns a block when it lies under the block's path; an unexpected
    key also when it names an ``experts`` module anywhere (a prefix or name that did not map).
    """
    blocks = {name: module for name, module in model.named_modules() if isinstance(module, DefusedExperts)}
    if not blocks:
        return {}
    prefixes = tuple(p + "." for p in blocks)
    # Weightless experts past the numbered ones (longcat_flash's identity experts) have checkpoint
    # slabs nothing reads: their keys are expected to find no parameter.
    unread = tuple(
        f"{path}.{i}." for path, block in blocks.items() for i in range(block.num_experts, getattr(block, "total_experts", 0))
    )

    def under_block(key: str) -> bool:
        return key.startswith(prefixes)

    problems = {
        "missing": sorted(k for k in loading_info.missing_keys if under_block(k)),
        "unexpected": sorted(
            k for k in loading_info.unexpected_keys
            if (under_block(k) or _EXPERT_SEGMENT.search(k)) and not (unread and k.startswith(unread))
        ),
        "mismatched": sorted(k[0] for k in loading_info.mismatched_keys if under_block(k[0])),
        "conversion errors": sorted(
            f"{k}: {v}" for k, v in (getattr(loading_info, "conversion_errors", None) or {}).items() if under_block(k) or _EXPERT_SEGMENT.search(k)
        ),
    }
    return {kind: keys for kind, keys in problems.items() if keys}


def format_problems(model_name: str, problems: dict[str, list[str]]) -> str:
    parts = []
    for kind, keys in problems.items():
        shown = ", ".join(keys[:_SHOWN]) + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")
        parts.append(f"{len(keys)} {kind}: {shown}")
    return (
        f"{model_name}: expert tensors of the checkpoint did not load into the defused experts (they would stay "
        f"randomly initialised): {'; '.join(parts)}. The checkpoint's expert names or layout do not match this "
        "family's; check it with `defuser-quant check CKPT`, or load it with `defuser_quant.load`."
    )


def check_expert_keys(model: nn.Module, loading_info: Any) -> None:
    """Raise ``ExpertLoadError`` when ``loading_info`` shows any expert key of ``model`` not loaded."""
    problems = expert_load_problems(model, loading_info)
    if problems:
        raise ExpertLoadError(format_problems(type(model).__name__, problems))


_ORIGINAL: list[Any] = []


def install() -> None:
    """Check expert keys after every ``from_pretrained`` until ``uninstall()`` (idempotent)."""
    from transformers.modeling_utils import PreTrainedModel

    if _ORIGINAL:
        return
    descriptor = PreTrainedModel.__dict__["_finalize_model_loading"]
    original = descriptor.__func__

    @functools.wraps(original)
    def _finalize_model_loading(model, load_config, loading_info):
        info = original(model, load_config, loading_info)
        check_expert_keys(model, info)
        return info

    _ORIGINAL.append(descriptor)
    PreTrainedModel._finalize_model_loading = staticmethod(_finalize_model_loading)


def uninstall() -> None:
    """Give ``from_pretrained`` back its own ``_finalize_model_loading``."""
    from transformers.modeling_utils import PreTrainedModel

    if _ORIGINAL:
        PreTrainedModel._finalize_model_loading = _ORIGINAL.pop()
