"""Trace one forward of a meta-device, defused model: which leaf runs when, on which input.

The generated GPTQModel definitions (``integrations.gptqmodel.definitions``) are derived from this trace
rather than from module names: execution order gives GPTQModel's sequential subsets, shared
input tensors give the groups quantized together, and the producer of each group's input tells
AWQ which previous op it may scale. Nothing is allocated: weights and activations stay on
``meta``, and each ``DefusedExperts`` block runs expert 0 only (all experts have the same
structure), so tracing a 48-layer model takes about a second.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from defuser_quant.core import convert_model
from defuser_quant.core.defused import DefusedExperts
from defuser_quant.core.errors import DefuserQuantError

logger = logging.getLogger(__name__)


class TraceError(DefuserQuantError):
    """The meta-device forward needed to derive a definition failed."""


@dataclass
class LeafCall:
    """One call of a leaf module (Linear, norm, router, or a whole experts block)."""

    name: str  # relative to the layer
    module: nn.Module
    inputs: int | None  # id of the root tensor of the first input
    output: int | None  # id of the root tensor of the output


@dataclass
class ModelTrace:
    """Per decoder layer, its leaf calls in execution order; plus the model-level calls."""

    layers_path: str
    layers: list[list[LeafCall]]
    top_level: list[str] = field(default_factory=list)  # direct children of the layers' parent, call order


def auto_class_for(config: Any) -> type:
    """The Auto class that builds a text-generating model for ``config.model_type``."""
    from transformers.models.auto import modeling_auto as ma

    model_type = config.model_type
    for mapping, auto_name in (
        ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
        ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
        ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", "AutoModelForPreTraining"),
    ):
        if model_type in getattr(ma, mapping, {}):
            return getattr(ma, auto_name)
    raise TraceError(f"{model_type!r}: Transformers has no causal-LM class for it")


def build_meta_model(config: Any) -> nn.Module:
    """``config``'s model on the meta device, defused."""
    config = copy.deepcopy(config)
    loader = auto_class_for(config)
    with torch.device("meta"):
        model = loader.from_config(config, attn_implementation="eager")
    convert_model(model, show_progress=False)
    return model.eval()


def _root(tensor: Any) -> int | None:
    if isinstance(tensor, (tuple, list)):
        tensor = tensor[0] if tensor else None
    if not isinstance(tensor, torch.Tensor):
        return None
    while tensor._base is not None:
        tensor = tensor._base
    return id(tensor)


def _is_leaf(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, DefusedExperts)):
        return True
    return next(module.children(), None) is None and any(True for _ in module.parameters(recurse=False))


def _layers_container(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(
            isinstance(m, DefusedExperts) for child in module for m in child.modules()
        ):
            return path, module
    raise TraceError(f"{type(model).__name__} has no ModuleList of decoder layers holding defused experts")


def _expert0_forward(block: DefusedExperts, hidden_states: torch.Tensor, *routing: Any) -> torch.Tensor:
    return block[0](hidden_states)


def trace_model(model: nn.Module, seq_len: int = 8) -> ModelTrace:
    """Run one meta forward of the defused ``model`` and record its leaf calls."""
    layers_path, layers = _layers_container(model)
    keep: list[Any] = []  # keeps traced tensors alive so their ids stay unique
    per_layer: list[list[LeafCall]] = [[] for _ in layers]
    handles = []
    blocks = [m for m in model.modules() if isinstance(m, DefusedExperts)]

    def make_hooks(index: int, name: str, module: nn.Module):
        call = {}

        def pre(mod, args, kwargs):
            first = args[0] if args else next(iter(kwargs.values()), None)
            keep.append(first)
            call["entry"] = LeafCall(name, mod, _root(first), None)
            per_layer[index].append(call["entry"])

        def post(mod, args, kwargs, output):
            keep.append(output)
            call["entry"].output = _root(output)

        return pre, post

    for index, layer in enumerate(layers):
        skip: set[int] = set()
        for name, module in layer.named_modules():
            if id(module) in skip:
                continue
            if isinstance(module, DefusedExperts):
                skip.update(id(m) for m in module.modules())
            if name and _is_leaf(module):
                pre, post = make_hooks(index, name, module)
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(module.register_forward_hook(post, with_kwargs=True))

    parent_path = layers_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    top_level: list[str] = []
    for name, child in parent.named_children():
        if child is not layers:
            handles.append(child.register_forward_pre_hook(lambda m, a, n=name: top_level.append(n)))

    previous = [(b, b.forward_override) for b in blocks]
    try:
        for block in blocks:
            block.forward_override = _expert0_forward
        ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
        with torch.no_grad():
            model(input_ids=ids)
    except Exception as exc:
        raise TraceError(f"meta-device forward of {type(model).__name__} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for block, override in previous:
            block.forward_override = override
        for handle in handles:
            handle.remove()
    return ModelTrace(layers_path, per_layer, top_level)
