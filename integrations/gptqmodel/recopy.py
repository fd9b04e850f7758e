"""The ``recopy`` part of :func:`~.overhead.lean_bookkeeping`: no second checkpoint copy of an
expert projection that GPTQModel's layer load has just put in place.

GPTQModel 7.6 loads a decoder layer from the lazy checkpoint source (``LazyTurtle``) as a whole
before its first subset pass (the input capture for layer 0, ``pre_quantize`` for the others): every
tensor of the layer, the experts' included, is copied from the checkpoint into the layer's
modules. Then, before each subset's forward replay, it prepares every module of the subset
(``shell_module_materialize(role="forward")``) and copies that module's checkpoint tensors into it
again. For an expert projection nothing writes to its weight in between in a plain GPTQ run (its
subset has not been quantized yet; the forwards only read it), so the second copy writes the
bytes that are already there. At Qwen3-30B-A3B shape that is 3.7 GB a layer pair on the main
thread, about 2.7 s of an H200 run (``sampled_gptqmodel_ours_cuda_round12a.txt``).

Here the layer load records, for every expert projection of our ``DefusedExperts`` blocks it
filled, each direct parameter and buffer: the tensor object, its storage address, dtype, shape
and device. The first forward preparation of that module after it skips the copy when all of
that is still so (the same objects at the same address: not replaced, not moved) and returns
what GPTQModel's copy returns (how many tensors it loaded). Anything else (no record, a tensor
replaced, moved or added, a second preparation) copies as GPTQModel does.

GPTQModel loads layer 0 on the CPU for the input capture and moves it to the quantize device in
``pre_quantize`` (``move_to``: the same parameter objects, their data copied to the device). With
:meth:`Recopy.follow_moves` the records of expert projections that were intact before that call and
hold the same parameter objects after it are taken again as the move left them, so layer 0 skips the
second copy too. Only GPTQModel 7.6's own ``pre_quantize`` (compared by source) is followed:
it materializes or moves a layer and writes nothing else. Inference tensors keep
no version counter, so an in-place write would go unseen: the part is only on for quantize
configs that write to no weight before the solve (plain GPTQ: no rotation, pre-processors,
smoothing, adapters, GPTAQ/FOEM or activation quantization; :func:`config_refusal`).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .compat import code_names, parameter_names, source_digest

__all__ = ["Recopy", "config_refusal", "internals_refusal", "pre_quantize_refusal"]

#: sha256[:16] of GPTQModel 7.6.0's ``BaseQModel.pre_quantize`` source (materialize or move, nothing else).
_PRE_QUANTIZE_SOURCE = "52c9ba27fef774ac"

#: QuantizeConfig fields that, when set, may rewrite weights before the solve.
_WRITERS = ("rotation", "preprocessors", "smoother", "smooth", "adapter", "gptaq", "foem", "activation")


def config_refusal(qcfg: Any) -> str | None:
    """Why the ``recopy`` part must stay stock for quantize config ``qcfg`` (None: it may run)."""
    from gptqmodel.quantization.config import METHOD, GPTQConfig

    if type(qcfg) is not GPTQConfig or getattr(qcfg, "method", None) != METHOD.GPTQ:
        return f"{type(qcfg).__name__} with method {getattr(qcfg, 'method', None)} (only plain GPTQ is known to leave weights alone)"
    missing = [name for name in _WRITERS if not hasattr(qcfg, name)]
    if missing:
        return f"GPTQConfig has no {', '.join(missing)} (another GPTQModel version)"
    set_ = [name for name in _WRITERS if getattr(qcfg, name)]
    if set_:
        return f"{', '.join(set_)} set (may write to weights before the solve)"
    return None


def internals_refusal() -> str | None:
    """What differs from the GPTQModel 7.6 internals the part relies on (None: nothing)."""
    from gptqmodel.utils import structure

    turtle = getattr(structure, "LazyTurtle", None)
    copy = getattr(turtle, "_copy_checkpoint_tensors_into_submodule", None)
    materialize = getattr(turtle, "materialize_submodule", None)
    if copy is None or materialize is None:
        return "LazyTurtle._copy_checkpoint_tensors_into_submodule or materialize_submodule is missing"
    want = {"self", "target_model", "target_submodule", "module_path", "device", "recurse", "non_blocking",
            "modules_by_name", "show_progress"}
    if parameter_names(copy) != want:
        return f"expected LazyTurtle._copy_checkpoint_tensors_into_submodule({', '.join(sorted(want))})"
    if "_copy_checkpoint_tensors_into_submodule" not in code_names(materialize):
        return "expected LazyTurtle.materialize_submodule to call _copy_checkpoint_tensors_into_submodule"
    return None


def pre_quantize_refusal() -> str | None:
    """Why a layer move in ``BaseQModel.pre_quantize`` must not be followed (None: it may be)."""
    from gptqmodel.models.base import BaseQModel

    pre = getattr(BaseQModel, "pre_quantize", None)
    if pre is None or source_digest(pre) != _PRE_QUANTIZE_SOURCE:
        return "BaseQModel.pre_quantize differs from GPTQModel 7.6.0's source"
    return None


def _direct_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


@dataclass
class _Filled:
    """The direct tensors of one expert projection as a layer load left them. The module object
    itself may be swapped (GPTQModel wraps a Linear it hooks in a new module sharing its weight)."""

    tensors: dict[str, tuple[weakref.ref, int, torch.dtype, torch.Size, torch.device]]

    @staticmethod
    def of(module: nn.Module) -> _Filled | None:
        tensors = {}
        for name, t in _direct_tensors(module):
            if t is None or t.is_meta:
                return None
            tensors[name] = (weakref.ref(t), t.data_ptr(), t.dtype, t.shape, t.device)
        return _Filled(tensors) if tensors else None

    def _held(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        """``module``'s direct tensors when they are the recorded objects with their dtype and shape."""
        now = dict(_direct_tensors(module))
        if now.keys() != self.tensors.keys() or not all(
                ref() is now[name] and now[name].dtype == dtype and now[name].shape == shape
                for name, (ref, _, dtype, shape, _) in self.tensors.items()):
            return None
        return now

    def unchanged(self, module: nn.Module, device: Any) -> bool:
        """``module`` holds exactly the tensor objects recorded, where they were, on ``device``."""
        now = self._held(module)
        if now is None:
            return False
        try:
            target = torch.device(device)
        except (TypeError, RuntimeError):
            return False
        return all(
            now[name].data_ptr() == ptr and now[name].device == where and where.type == target.type
            and (target.index is None or where.index == target.index)
            for name, (_, ptr, _, _, where) in self.tensors.items())

    def intact(self, module: nn.Module) -> bool:
        """``module`` holds the recorded tensor objects, unchanged, where they were recorded."""
        return self.unchanged(module, next(iter(self.tensors.values()))[4])

    def same_objects(self, module: nn.Module) -> bool:
        """``module`` holds the recorded tensor objects with their dtype and shape (the data may have moved)."""
        return self._held(module) is not None

    def first_tensor(self) -> torch.Tensor | None:
        return next(iter(self.tensors.values()))[0]()


class Recopy:
    """The patched ``LazyTurtle._copy_checkpoint_tensors_into_submodule`` of one lean block.

    ``expert_paths``: our expert projections; ``preparing()``: the ``(model, module, path)`` a lean
    forward preparation runs for on this thread (the materialize part's hint), else None.
    """

    def __init__(self, model: nn.Module, expert_paths: frozenset[str], preparing: Callable[[], tuple | None],
                 count: Callable[[str, int], None]) -> None:
        self.model = model
        self.expert_paths = expert_paths
        self.preparing = preparing
        self.count = count  # (stats field, n): add n
        self.filled: dict[str, _Filled] = {}
        self.lock = threading.Lock()

    def patch(self, original: Callable) -> Callable:
        recopy = self

        def _copy_checkpoint_tensors_into_submodule(self, *, target_model, target_submodule, module_path, device,
                                                    recurse, non_blocking, modules_by_name=None, show_progress=True):
            hint = recopy.preparing()
            if hint is not None and hint[0] is target_model and hint[1] is target_submodule and hint[2] == module_path:
                with recopy.lock:
                    filled = recopy.filled.pop(module_path, None)
                if filled is not None and filled.unchanged(target_submodule, device):
                    recopy.count("recopy_skipped", 1)
                    return len(filled.tensors)  # what GPTQModel's copy of these tensors returns
                recopy.count("recopy_copied" if filled is None else "recopy_changed", 1)
            loaded = original(self, target_model=target_model, target_submodule=target_submodule,
                              module_path=module_path, device=device, recurse=recurse, non_blocking=non_blocking,
                              modules_by_name=modules_by_name, show_progress=show_progress)
            if hint is None and target_model is recopy.model and recurse and loaded:
                recopy.record(target_submodule, module_path)
            return loaded

        return _copy_checkpoint_tensors_into_submodule

    def follow_moves(self, original: Callable, gptq_model: Any) -> Callable:
        """``BaseQModel.pre_quantize`` of ``gptq_model``, re-recording the expert projections its move
        of a layer left in place (see the module docstring)."""
        recopy = self

        @functools.wraps(original)
        def pre_quantize(self, module):
            if self is not gptq_model:
                return original(self, module)
            intact = recopy._intact_under(module)
            result = original(self, module)
            if result is module and intact:
                recopy._take_moved(intact)
            return result

        return pre_quantize

    def _intact_under(self, layer: nn.Module) -> dict[str, tuple[nn.Module, _Filled]]:
        with self.lock:
            records = list(self.filled.items())
        if not records:
            return {}
        holders = {id(t): m for m in layer.modules() for _, t in _direct_tensors(m)}
        intact = {}
        for path, filled in records:
            first = filled.first_tensor()
            holder = holders.get(id(first)) if first is not None else None
            if holder is not None and filled.intact(holder):
                intact[path] = (holder, filled)
        return intact

    def _take_moved(self, intact: dict[str, tuple[nn.Module, _Filled]]) -> None:
        taken = 0
        for path, (holder, filled) in intact.items():
            if filled.intact(holder) or not filled.same_objects(holder):
                continue  # not moved (the record still holds), or replaced (it copies again)
            moved = _Filled.of(holder)
            with self.lock:
                if moved is not None and self.filled.get(path) is filled:
                    self.filled[path] = moved
                    taken += 1
        if taken:
            self.count("recopy_moved", taken)

    def record(self, loaded: nn.Module, path: str | None) -> None:
        """Remember the expert projections under ``loaded`` (at ``path``) as this load left them."""
        prefix = f"{path}." if path else ""
        found = {}
        for name, module in loaded.named_modules():
            full = f"{prefix}{name}" if name else (path or "")
            if full in self.expert_paths:
                filled = _Filled.of(module)
                if filled is not None:
                    found[full] = filled
        if found:
            with self.lock:
                self.filled.update(found)
            self.count("recopy_recorded", len(found))
