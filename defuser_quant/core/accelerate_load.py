"""Fused checkpoints through accelerate's loaders into models defused before loading.

accelerate's ``load_checkpoint_in_model`` with a ``device_map`` (the path of
``load_checkpoint_and_dispatch``, of ``init_empty_weights`` models and of cpu/disk offload) sets only
the keys of ``model.state_dict()``: a fused checkpoint's ``experts.gate_up_proj`` would be skipped
with a warning, leaving the defused experts random or on ``meta``. ``install()`` (run whenever a block is
defused, built defused or unpickled) wraps the per-file reader that function calls, ``accelerate.utils.modeling.
load_state_dict``. That name is looked up when the loader runs, so every entry point and every
import of the loader is covered. When the reader is called by ``load_checkpoint_in_model`` for a
model holding ``DefusedExperts``, each fused tensor in the file is carved into the block's
per-expert keys, which accelerate then casts, places and offloads like any other key. For any other
caller or model the reader returns accelerate's result untouched.

The reader finds the model being loaded in its caller's frame (the ``model`` argument of
accelerate's ``load_checkpoint_in_model``, recognised by its code object); ``install()`` checks that
the installed accelerate still reads files through that name, and warns when it cannot carve.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from types import CodeType

import torch
from torch import nn

from .defused import DefusedExperts, on_block_created
from .errors import DefuserQuantError

logger = logging.getLogger(__name__)

_MARK = "_defuser_quant_carves"


class FusedCheckpointError(DefuserQuantError, ValueError):
    """A fused checkpoint's expert tensors cannot be carved into the defused experts (other shape, or
    given next to per-expert keys): loading them would leave the experts random."""


_STATE: dict[str, object] = {}


def carve_fused_checkpoint(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "the checkpoint") -> int:
    """Replace, in ``state_dict``, the fused tensors of ``model``'s defused blocks by their per-expert keys.

    Keys are ``model``-relative (``model.layers.0.mlp.experts.gate_up_proj``). Returns the number of
    fused tensors carved; raises ``FusedCheckpointError`` naming the keys when a fused tensor has another
    shape than the block was defused from or comes next to that block's per-expert keys (``state_dict``
    is left as it was).
    """
    blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, DefusedExperts)]
    if not blocks:
        return 0
    carved = dict(state_dict)
    problems: list[str] = []
    count = 0
    for path, block in blocks:
        prefix = f"{path}." if path else ""
        present = sum(prefix + spec.name in carved for spec in block.specs.values())
        problems += block.carve_fused(carved, prefix)
        count += present
    if problems:
        raise FusedCheckpointError(
            f"{source}: fused expert tensors cannot be carved into the defused experts of {type(model).__name__}: "
            f"{'; '.join(problems)}. Load a checkpoint of this model's shape, in one layout (fused or per-expert)."
        )
    if count:
        state_dict.clear()
        state_dict.update(carved)
        logger.debug("%s: carved %d fused expert tensors into per-expert keys", source, count)
    return count


def _loaded_model(loader_code: CodeType) -> nn.Module | None:
    """The ``model`` argument of the ``load_checkpoint_in_model`` call two frames up, if that is the caller."""
    frame = sys._getframe(2)
    if frame.f_code is not loader_code:
        return None
    model = frame.f_locals.get("model")
    return model if isinstance(model, nn.Module) else None


def _carving_reader(original: Callable, loader_code: CodeType) -> Callable:
    @functools.wraps(original)
    def load_state_dict(checkpoint_file, *args, **kwargs):
        state = original(checkpoint_file, *args, **kwargs)
        model = _loaded_model(loader_code)
        if model is not None and isinstance(state, dict):
            carve_fused_checkpoint(model, state, source=str(checkpoint_file))
        return state

    setattr(load_state_dict, _MARK, True)
    load_state_dict.__wrapped__ = original  # type: ignore[attr-defined]
    return load_state_dict


def install() -> bool:
    """Make accelerate's ``load_checkpoint_in_model`` carve fused checkpoints for defused models.

    Idempotent; returns True when carving is in place, False without accelerate or, with a warning,
    when the installed accelerate does not read checkpoint files through ``load_state_dict``.
    """
    if _STATE.get("installed"):
        return True
    try:
        from accelerate.utils import modeling
    except ImportError:
        return False
    reader = getattr(modeling, "load_state_dict", None)
    if getattr(reader, _MARK, False):
        _STATE["installed"] = True
        return True
    loader = getattr(modeling, "load_checkpoint_in_model", None)
    code = getattr(loader, "__code__", None)
    if reader is None or code is None or "load_state_dict" not in code.co_names or "model" not in code.co_varnames[: code.co_argcount]:
        if not _STATE.get("warned"):
            _STATE["warned"] = True
            logger.warning(
                "this accelerate does not read checkpoints through accelerate.utils.modeling.load_state_dict: "
                "load_checkpoint_in_model / load_checkpoint_and_dispatch with a device_map cannot load a FUSED "
                "checkpoint into a model defused before loading (its experts would stay random or on meta). "
                "Load first and convert after, or use model.load_state_dict."
            )
        return False
    modeling.load_state_dict = _carving_reader(reader, code)
    _STATE["installed"] = True
    return True


def uninstall() -> None:
    """Give accelerate its own reader back (tests)."""
    try:
        from accelerate.utils import modeling
    except ImportError:
        return
    reader = getattr(modeling, "load_state_dict", None)
    if getattr(reader, _MARK, False):
        modeling.load_state_dict = reader.__wrapped__
    _STATE.pop("installed", None)


on_block_created(install)
