"""GPTQModel model definitions generated from the defused structure, for families it lacks.

GPTQModel needs a ``BaseQModel`` subclass with a ``module_tree`` per model type; without one
it falls back to an auto-detected tree that fails on MoE (and refuses AWQ). For every model
type our core defuses but GPTQModel 7.6 does not define (exaone_moe, flex_olmo,
granitemoeshared, mistral4, ...), :func:`generate_definition` derives one from a meta-device
trace of the defused model (``integrations.gptqmodel.trace``):

* top-level children of a decoder layer, in execution order; parameter-only leaves (norms)
  become ``name:!`` entries;
* Linear leaves are grouped by the tensor they read (one GPTQ subset per distinct input, in
  execution order); a norm that feeds a group gets its own ``!`` block right before it, so AWQ
  takes it as the previous op;
* the parent of a ``DefusedExperts`` block is the MoE root (``:moe:?``): routers and
  one-output gates are ``!``, shared experts keep their grouping, routed experts are
  ``experts.#.(gate_proj|up_proj):0, down_proj:1``;
* AWQ scaling nodes are kept only where the trace shows the previous op produces the scaled
  modules' input (plus expert down_proj after up_proj for plain ``act(gate) * up`` gating), so
  a generated definition never applies an invalid scale.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Any

from torch import nn

from defuser_quant.core.defused import DefusedExperts
from defuser_quant.core.naming import DEFAULT_NAMES, UNGATED_DEFAULT_NAMES, ProjectionNames, projection_names
from defuser_quant.core.errors import DefuserQuantError
from defuser_quant.core.model_config import text_config

from .trace import LeafCall, ModelTrace, auto_class_for, build_meta_model, trace_model

logger = logging.getLogger(__name__)

_GENERATED: dict[str, type] = {}
_REPLACED: dict[str, type | None] = {}
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")


class DefinitionGenerationError(DefuserQuantError):
    """A GPTQModel definition could not be derived for this model."""


# ----- module tree --------------------------------------------------------------------------
def _first_calls(calls: list[LeafCall]) -> list[LeafCall]:
    seen: set[str] = set()
    out = []
    for call in calls:
        if call.name not in seen:
            seen.add(call.name)
            out.append(call)
    return out


def _grouped_tokens(calls: list[LeafCall], strip: str) -> tuple[str, ...]:
    """Tokens for the leaves of one subtree: Linears grouped by input, norms as ``!`` entries."""
    producers = {c.output: c for c in calls if not isinstance(c.module, nn.Linear) and c.output is not None}
    feeds = {c.inputs for c in calls if isinstance(c.module, nn.Linear)}
    group_of: dict[int | None, int] = {}
    tokens: list[tuple[int, str]] = []
    next_group = 0
    current = 0
    emitted: set[str] = set()
    for call in calls:
        rel = call.name[len(strip):] if strip else call.name
        if isinstance(call.module, nn.Linear):
            if call.inputs not in group_of:
                norm = producers.get(call.inputs)
                if norm is not None and norm.name not in emitted and (norm.name.startswith(strip) if strip else True):
                    tokens.append((next_group, f"{norm.name[len(strip):] if strip else norm.name}:!:{next_group}"))
                    emitted.add(norm.name)
                    next_group += 1
                group_of[call.inputs] = next_group
                next_group += 1
            current = group_of[call.inputs]
            tokens.append((current, f"{rel}:{current}"))
        elif call.name not in emitted and call.output not in feeds:
            tokens.append((current, f"{rel}:!:{current}" if current else f"{rel}:!"))
            emitted.add(call.name)
    return tuple(t for _, t in sorted(tokens, key=lambda t: t[0]))


def _expert_tokens(block: DefusedExperts, model_type: str) -> tuple[str, ...]:
    original = projection_names(model_type, block.layout.has_gate)
    canonical = DEFAULT_NAMES if block.layout.has_gate else UNGATED_DEFAULT_NAMES
    tokens = []
    for role, group in (("gate", 0), ("up", 0), ("down", 1)):
        name = getattr(canonical, role)
        if name is None:
            continue
        alias = getattr(original, role)
        token = name if alias in (None, name) else f"{name}|{alias}"
        tokens.append(f"{token}:{group}")
    return tuple(tokens)


def _moe_entries(root: str, calls: list[LeafCall], block_name: str, block: DefusedExperts, model_type: str) -> dict:
    entries: dict[str, Any] = OrderedDict()
    prefix = f"{root}."
    children: dict[str, list[LeafCall]] = OrderedDict()
    for call in calls:
        child = call.name[len(prefix):].split(".", 1)[0]
        children.setdefault(child, []).append(call)
    for child, child_calls in children.items():
        path = f"{prefix}{child}"
        if path == block_name:
            entries[child] = {"#": _expert_tokens(block, model_type)}
            continue
        single = child_calls[0]
        if len(child_calls) == 1 and single.name == path:
            module = single.module
            is_router = not isinstance(module, nn.Linear) or module.out_features in (1, len(block))
            entries[child] = (f"{child}:!",) if is_router else (f"{child}:0",)
        else:
            entries[child] = _grouped_tokens(child_calls, f"{path}.")
    return entries


def _layer_tree(calls: list[LeafCall], model_type: str) -> dict[str, Any]:
    calls = _first_calls(calls)
    tree: dict[str, Any] = OrderedDict()
    experts = {c.name: c.module for c in calls if isinstance(c.module, DefusedExperts)}
    moe_roots = {name.rpartition(".")[0]: name for name in experts}
    if "" in moe_roots:
        raise DefinitionGenerationError("experts directly under the decoder layer (no MoE root module) are not supported")
    children: dict[str, list[LeafCall]] = OrderedDict()
    for call in calls:
        root = next((r for r in moe_roots if call.name == r or call.name.startswith(f"{r}.")), None)
        key = root if root is not None else call.name.split(".", 1)[0]
        children.setdefault(key, []).append(call)
    for key, child_calls in children.items():
        if key in moe_roots:
            block_name = moe_roots[key]
            tree[f"{key}:moe:?"] = _moe_entries(key, child_calls, block_name, experts[block_name], model_type)
        elif len(child_calls) == 1 and child_calls[0].name == key and not isinstance(child_calls[0].module, nn.Linear):
            tree[key] = (f"{key}:!",)
        elif len(child_calls) == 1 and child_calls[0].name == key:
            tree[key] = (f"{key}:0",)
        else:
            tree[key] = _grouped_tokens(child_calls, f"{key}.")
    return tree


def _merge_trees(trees: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """Union of per-layer trees (MoE layers first); True when layers differ."""
    merged: dict[str, Any] = OrderedDict()
    base_of: dict[str, str] = {}
    differ = any(t != trees[0] for t in trees)
    for tree in trees:
        for key, value in tree.items():
            base = key.split(":", 1)[0]
            existing = base_of.get(base)
            if existing is None:
                merged[key] = value
                base_of[base] = key
            elif merged[existing] != value:
                old = merged[existing]
                if isinstance(old, dict) and isinstance(value, tuple):
                    old.setdefault("", value)
                elif isinstance(old, tuple) and isinstance(value, dict):
                    value = OrderedDict(value)
                    value.setdefault("", old)
                    merged.pop(existing)
                    merged[key] = value
                    base_of[base] = key
    return merged, differ


def module_tree_from_trace(trace: ModelTrace, model_type: str) -> tuple[list[Any], bool]:
    """``(module_tree, layers_differ)`` for a traced model."""
    trees = [_layer_tree(calls, model_type) for calls in trace.layers if calls]
    moe_first = sorted(trees, key=lambda t: not any(k.endswith(":moe:?") for k in t))
    mapping, differ = _merge_trees(moe_first)
    return [*trace.layers_path.split("."), "#", _plain(mapping)], differ


def _plain(node: Any) -> Any:
    return {k: _plain(v) for k, v in node.items()} if isinstance(node, dict) else node


# ----- other definition attributes ----------------------------------------------------------
def _expert_count_field(config: Any, num_experts: int) -> str:
    text = text_config(config)
    for name in _EXPERT_COUNT_FIELDS:
        if getattr(text, name, None) == num_experts:
            return name
    for name, value in sorted(vars(text).items()):
        if isinstance(value, int) and value == num_experts and "expert" in name and "per_tok" not in name:
            return name
    raise DefinitionGenerationError(f"no config field holds the expert count {num_experts}")


def _final_norm(model: nn.Module, trace: ModelTrace) -> str | None:
    parent = trace.layers_path.rpartition(".")[0]
    layers_name = trace.layers_path.rpartition(".")[2]
    after = trace.top_level[trace.top_level.index(layers_name) + 1:] if layers_name in trace.top_level else trace.top_level
    for name in reversed(after or trace.top_level):
        path = f"{parent}.{name}" if parent else name
        module = model.get_submodule(path)
        if any(True for _ in module.parameters()) and not isinstance(module, nn.Embedding):
            return path
    return None


def _lm_head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return "lm_head"


def _producers(trace: ModelTrace, kind: type) -> dict[str, str | None]:
    """Layer-relative name of each ``kind`` leaf -> name of the leaf whose output it reads (any layer)."""
    out: dict[str, str | None] = {}
    for calls in trace.layers:
        by_output = {c.output: c.name for c in calls if c.output is not None}
        for c in calls:
            if isinstance(c.module, kind):
                out.setdefault(c.name, by_output.get(c.inputs))
    return out


# ----- the class ----------------------------------------------------------------------------
def _awq_filter(producers: dict[str, str | None], expert_sources: dict[str, str | None], plain_gate: bool):
    from gptqmodel.models.base import BaseQModel

    def awq_get_modules_for_scaling(self, module, input_feat, module_kwargs):
        nodes = BaseQModel.awq_get_modules_for_scaling(self, module, input_feat, module_kwargs)
        names = {id(m): n for n, m in module.named_modules()}
        kept = []
        for node in nodes:
            prev = names.get(id(node.get("prev_op")))
            targets = [names.get(id(m)) for m in node.get("layers", [])]
            if _awq_node_valid(prev, targets, producers, expert_sources, plain_gate):
                kept.append(node)
            else:
                logger.debug("AWQ: no scaling of %s against %s (not its input's producer)", targets, prev)
        return kept

    return awq_get_modules_for_scaling


_EXPERT_PROJ = re.compile(r"^(?P<block>.+)\.(?P<index>\d+)\.(?P<proj>[^.]+)$")


def _awq_node_valid(prev, targets, producers, sources, plain_gate) -> bool:
    if prev is None or not targets or any(t is None for t in targets):
        return False
    for target in targets:
        match = _EXPERT_PROJ.match(target)
        if match and match.group("block") in sources:
            proj = match.group("proj")
            if proj.startswith("down"):
                if not (plain_gate and prev == f"{match.group('block')}.{match.group('index')}.up_proj"):
                    return False
            elif sources[match.group("block")] != prev:
                return False
        elif producers.get(target) != prev:
            return False
    return True


def generate_definition(config: Any, model_type: str | None = None, base: type | None = None) -> type:
    """A ``BaseQModel`` subclass for ``config``'s model type, derived from its defused structure.

    ``base`` (default ``BaseQModel``) lets a generated tree replace the tree of an existing
    definition while keeping its model-specific hooks.

    Raises:
        DefinitionGenerationError: the model has no defused experts or cannot be traced.
    """
    from gptqmodel.models.base import BaseQModel
    from gptqmodel.models.moe_lifecycle import GateUpDownMoELifecycleHooks

    model_type = (model_type or config.model_type).lower()
    model = build_meta_model(config)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, DefusedExperts)]
    if not blocks:
        raise DefinitionGenerationError(f"{model_type!r}: no fused experts to defuse, nothing to generate")
    _canonical_names(model)
    trace = trace_model(model)
    tree, differ = module_tree_from_trace(trace, model_type)
    counts = {len(b) for _, b in blocks}
    if len(counts) != 1:
        raise DefinitionGenerationError(f"{model_type!r}: experts blocks of different sizes {sorted(counts)}")
    block = blocks[0][1]
    layout = block.layout
    plain_gate = layout.has_gate and not block[0].gate_fn.custom
    attrs: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": f"Generated by defuser-quant from the defused {model_type} structure.",
        "module_tree": tree,
        "module_tree_overrides": None,
        "dynamic_expert_index": _expert_count_field(config, counts.pop()),
        "pre_lm_head_norm_module": _final_norm(model, trace),
        "lm_head": _lm_head_name(model),
        "layer_modules_strict": not differ,
        "loader": auto_class_for(config),
        "support_offload_to_disk": layout.has_gate and layout.is_concatenated and not layout.is_transposed,
        "awq_get_modules_for_scaling": _awq_filter(
            _producers(trace, nn.Linear), _producers(trace, DefusedExperts), plain_gate
        ),
        "defuser_quant_generated": True,
    }
    if layout.has_gate:
        attrs["moe_lifecycle_hooks"] = GateUpDownMoELifecycleHooks()
    name = "".join(part.capitalize() for part in re.split(r"[^0-9a-zA-Z]+", model_type)) + "DefusedQModel"
    cls = type(name, (base or BaseQModel,), attrs)
    logger.info("generated GPTQModel definition %s: %s", name, tree)
    return cls


def _canonical_names(model: nn.Module) -> None:
    for block in model.modules():
        if isinstance(block, DefusedExperts):
            names: ProjectionNames = DEFAULT_NAMES if block.layout.has_gate else UNGATED_DEFAULT_NAMES
            if block.names != names:
                block.rename_projections(names)


# ----- registry -----------------------------------------------------------------------------
def has_definition(model_type: str) -> bool:
    """True when GPTQModel (or this plugin) has a definition for ``model_type``."""
    from gptqmodel.models import auto

    return model_type.lower() in auto.SUPPORTED_MODELS


def register_generated_definition(model_type: str, config: Any | None = None, *, replace: bool = False) -> type:
    """Generate and register a definition for ``model_type`` (``config`` defaults to the family's).

    Keeps GPTQModel's own definition unless ``replace``; a replacing definition subclasses the
    one it replaces (its model-specific hooks stay). Undone by :func:`unregister_generated`.
    """
    from gptqmodel.models import auto

    model_type = model_type.lower()
    if model_type in _GENERATED and not replace:
        return _GENERATED[model_type]
    if has_definition(model_type) and model_type not in _GENERATED and not replace:
        return auto.MODEL_MAP[model_type]
    if config is None:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        config = CONFIG_MAPPING[model_type]()
    base = _REPLACED.get(model_type, auto.MODEL_MAP.get(model_type))
    cls = generate_definition(config, model_type, base=base)
    if model_type not in _REPLACED:
        _REPLACED[model_type] = auto.MODEL_MAP.get(model_type)
    auto.MODEL_MAP[model_type] = cls
    if model_type not in auto.SUPPORTED_MODELS:
        auto.SUPPORTED_MODELS.append(model_type)
    _GENERATED[model_type] = cls
    return cls


def generated_definitions() -> dict[str, type]:
    """The definitions this plugin registered, by model type."""
    return dict(_GENERATED)


def unregister_generated() -> None:
    """Remove every generated definition and put back what it replaced."""
    from gptqmodel.models import auto

    for model_type, previous in _REPLACED.items():
        if previous is None:
            auto.MODEL_MAP.pop(model_type, None)
            while model_type in auto.SUPPORTED_MODELS:
                auto.SUPPORTED_MODELS.remove(model_type)
        else:
            auto.MODEL_MAP[model_type] = previous
    _REPLACED.clear()
    _GENERATED.clear()


def definition_lookup(original):
    """Wrap ``auto.check_and_get_model_definition``: generate a definition when GPTQModel has none."""

    def check_and_get_model_definition(model_dir, trust_remote_code=False, **config_load_kwargs):
        cls = original(model_dir, trust_remote_code, **config_load_kwargs)
        from gptqmodel.models.base import BaseQModel

        if cls is not BaseQModel:
            return cls
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, **config_load_kwargs)
        from defuser_quant.core.patching import fused_experts_classes

        try:
            supported = bool(fused_experts_classes(config.model_type))
        except DefuserQuantError:
            supported = False
        if not supported:
            return cls
        logger.info("GPTQModel has no definition for %r: generating one from the defused structure", config.model_type)
        return register_generated_definition(config.model_type, config)

    check_and_get_model_definition.__defuser_quant_original__ = original  # type: ignore[attr-defined]
    return check_and_get_model_definition
