"""Accelerate offload: defuse blocks whose fused tensors live in a hook's ``weights_map``.

A model dispatched with ``device_map`` and cpu/disk offload keeps offloaded parameters on
``meta`` and loads them in an ``AlignDevicesHook`` before each forward. Defusing such a block
reads the fused tensors from the hook, carves them, and hands the per-expert tensors to a new
hook on the defused block, so nothing that was real before is left on ``meta``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .layout import ExpertLayout


def _align_hook(module: nn.Module) -> Any | None:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for candidate in [hook, *getattr(hook, "hooks", [])]:
        if type(candidate).__name__ == "AlignDevicesHook":
            return candidate
    return None


def materialize_offloaded(
    module: nn.Module, layout: ExpertLayout | Iterable[str], undo: list[Callable[[], None]]
) -> dict | None:
    """Load offloaded fused tensors of ``module`` onto the CPU; returns the hook settings to reuse.

    ``layout`` is the block's layout or its fused tensor paths; tensors held by submodules
    (dotted paths, irregular families) are read by their own hooks and are not handled here.
    """
    hook = _align_hook(module)
    if hook is None:
        return None
    state = {"execution_device": hook.execution_device, "offload": bool(hook.offload), "io_same_device": hook.io_same_device}
    if not hook.offload or hook.weights_map is None:
        return state
    names = layout.fused_names if isinstance(layout, ExpertLayout) else tuple(layout)
    for name in names:
        if "." in name:
            continue
        store = module._parameters if name in module._parameters else module._buffers
        current = store[name]
        if current.device.type != "meta":
            continue
        value = hook.weights_map[name].to(dtype=current.dtype)
        store[name] = nn.Parameter(value, requires_grad=current.requires_grad) if isinstance(current, nn.Parameter) else value
        undo.append(lambda s=store, n=name, t=current: s.__setitem__(n, t))
    return state


def rehook_offloaded(defused: nn.Module, state: dict | None) -> None:
    """Attach an equivalent ``AlignDevicesHook`` to the defused block (its weights offloaded again)."""
    if state is None:
        return
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    weights_map = None
    if state["offload"]:
        weights_map = {name: t.detach() for name, t in defused.state_dict(keep_vars=True).items()}
    hook = AlignDevicesHook(
        execution_device=state["execution_device"],
        offload=state["offload"],
        io_same_device=state["io_same_device"],
        weights_map=weights_map,
        place_submodules=True,
    )
    with torch.no_grad():
        add_hook_to_module(defused, hook)
