"""Make per-expert float weights own their storage before GPTQModel saves.

``convert_model`` carves per-expert weights as zero-copy views of one fused tensor. GPTQModel's
writer (``get_state_dict_for_save``) de-duplicates tensors *by storage* like safetensors does,
so of N unquantized experts viewing one fused tensor only the first would be written; the rest
vanish with a "Removed shared tensor" warning. Quantized experts are safe (their packed
buffers are new tensors); experts left in float (excluded by ``dynamic``, or never reached) are
not. :func:`own_expert_storage` copies exactly the shared ones, one tensor at a time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from defuser_quant.core.defused import DefusedExperts

logger = logging.getLogger(__name__)


def _storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    if tensor.device.type == "meta":
        return None
    return tensor.device.type, tensor.untyped_storage().data_ptr()


def shared_expert_tensors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters inside ``DefusedExperts`` blocks whose storage another model tensor also uses."""
    by_storage: dict[tuple[str, int], list[tuple[str, Any]]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        key = _storage_key(tensor)
        if key is not None:
            by_storage.setdefault(key, []).append((name, tensor))
    expert_prefixes = tuple(f"{p}." for p, m in model.named_modules() if isinstance(m, DefusedExperts))
    shared = []
    for entries in by_storage.values():
        if len({id(t) for _, t in entries}) < 2:
            continue
        shared += [(n, t) for n, t in entries if n.startswith(expert_prefixes) and isinstance(t, nn.Parameter)]
    return shared


def own_expert_storage(model: nn.Module) -> int:
    """Give every expert parameter that shares storage its own copy, in place. Returns the count.

    The parameter objects stay the same (only ``.data`` changes), so module references, hooks
    and optimizers keep working; the fused storage is freed once no view is left.
    """
    shared = shared_expert_tensors(model)
    nbytes = 0
    with torch.no_grad():
        for _, param in shared:
            param.data = param.data.clone(memory_format=torch.contiguous_format)
            nbytes += param.numel() * param.element_size()
    if shared:
        logger.info("copied %d expert tensor(s) (%.1f MiB) that shared storage, so saving keeps all of them", len(shared), nbytes / 2**20)
    return len(shared)


def guarded_state_dict_for_save(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap GPTQModel's ``get_state_dict_for_save`` so shared expert storage is owned first."""

    @functools.wraps(original)
    def get_state_dict_for_save(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        own_expert_storage(model)
        return original(model, *args, **kwargs)

    get_state_dict_for_save.__defuser_quant_original__ = original  # type: ignore[attr-defined]
    return get_state_dict_for_save
