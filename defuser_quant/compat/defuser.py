"""Defuser 0.0.28's public API over defuser-quant's core: swap ``import defuser`` for
``from defuser_quant.compat import defuser`` and code written against Defuser runs unchanged.

Same names (``convert_model``, ``replace_fused_blocks``), signatures, defaults and return types
(``bool``) as Defuser documents them; the conversion itself is the core's (exact, transactional,
every family Transformers describes). Where Defuser returns ``False`` for a model it does not
know, so does this; where the core refuses a block it does not model, this raises (Defuser would
leave it fused and say nothing). Known differences: docs/compat-defuser.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from ..core import convert_model as _convert_model
from ..core import replace_fused_blocks as _replace_fused_blocks
from ..core.errors import UnmodelledStructureError, UnsupportedModelError
from ..core.patching import is_patched

logger = logging.getLogger(__name__)

__all__ = ["convert_model", "replace_fused_blocks"]


def _check_filter(filter: Sequence[str] | None) -> None:
    """Defuser's rule: a sequence of regex strings (a bare string is refused, not split into characters)."""
    if filter is None:
        return
    if isinstance(filter, (str, bytes)) or not isinstance(filter, Sequence):
        raise TypeError("filter must be a sequence of regex strings")
    if not all(isinstance(rule, str) for rule in filter):
        raise TypeError("filter rules must be strings")


def convert_model(
    model: nn.Module,
    cleanup_original: bool = False,
    max_layers: int | None = None,
    filter: list[str] | None = None,
) -> bool:
    """Convert one loaded model in place from fused experts to defused modules (Defuser's call).

    Returns True when at least one block was converted; False when there was nothing to convert
    (no fused block, or every block already defused, as after ``replace_fused_blocks``).
    ``cleanup_original`` False (Defuser's default) keeps the fused tensors readable; True drops
    them. ``max_layers`` below 1 raises ``ValueError``; ``filter`` takes ``+:regex``/``-:regex``/
    ``regex`` rules, negative wins. Raises ``UnmodelledStructureError`` for a block whose structure
    the core does not model, leaving the model as it was.
    """
    if max_layers is not None and max_layers < 1:
        raise ValueError("max_layers must be >= 1 when provided")
    _check_filter(filter)
    report = _convert_model(model, filter=filter, max_layers=max_layers, cleanup_original=bool(cleanup_original))
    return bool(report.converted)


def replace_fused_blocks(model_type: str) -> bool:
    """Patch ``model_type``'s classes so later loads build defused blocks (Defuser's call).

    Returns True when ``model_type`` is patched after the call (also when it already was, as
    Defuser re-patches), False for a model type with nothing to patch or unknown to Transformers.
    Raises ``UnmodelledStructureError`` for a family whose experts the core does not model.
    """
    try:
        _replace_fused_blocks(model_type)
    except UnmodelledStructureError:
        raise
    except UnsupportedModelError as exc:
        logger.info("replace_fused_blocks(%r): nothing patched: %s", model_type, exc)
        return False
    return is_patched(model_type)
