"""After-load conversion: fused experts blocks -> ``DefusedExperts`` in place, transactionally."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .defused import DefusedExpert, DefusedExperts, FusedTensorSpec, GateFunction, fast_linear
from .errors import ConversionError, DefuserQuantError, SharedStorageError
from .filters import FilterRules
from .layout import ExpertLayout, ExpertShapes, check_shapes, fused_tensor, layout_of
from .naming import ProjectionNames, projection_names, stock_loads_per_expert
from .progress import progress
from .report import BlockRecord, ConversionReport
from .slicing import carve, down_pieces, in_bias_pieces, in_proj_pieces, needs_relayout, restore_slab, whole_slab

logger = logging.getLogger(__name__)
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass
class BlockPlan:
    path: str
    parent: nn.Module
    attr: str
    module: nn.Module
    aliases: list[tuple[str, nn.Module, str]]  # every (path, parent, attr) holding this module
    layout: ExpertLayout
    shapes: ExpertShapes
    names: ProjectionNames
    model_type: str | None = None
    top_model_type: str | None = None


def pieces_fns(layout: ExpertLayout) -> dict[str, Callable]:
    """Piece functions for every fused tensor of ``layout``."""
    fns = {layout.in_proj: in_proj_pieces(layout), "down_proj": down_pieces(layout)}
    if layout.has_bias:
        fns[f"{layout.in_proj}_bias"] = in_bias_pieces(layout)
        fns["down_proj_bias"] = whole_slab
    return fns


def _model_type_of(module: nn.Module, fallback: str | None) -> str | None:
    config = getattr(module, "config", None)
    return getattr(config, "model_type", None) or fallback


def _layer_index(path: str) -> int | None:
    match = _LAYER_INDEX.search(f".{path}.")
    return int(match.group(1)) if match else None


def _storage_key(t: torch.Tensor) -> int | None:
    if t.device.type == "meta":
        return None
    return t.untyped_storage().data_ptr()


def _tie_key(plan: BlockPlan) -> tuple[int, ...]:
    """Identity of a block's fused tensors: equal for blocks tied to each other (same Parameters)."""
    return tuple(id(fused_tensor(plan.module, name)) for name in plan.layout.fused_names)


def _check_not_shared(model: nn.Module, plans: list[BlockPlan]) -> None:
    owners: dict[int, list[str]] = {}
    storages: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        owners.setdefault(id(tensor), []).append(name)
        key = _storage_key(tensor)
        if key is not None:
            storages.setdefault(key, []).append(name)
    for plan in plans:
        # The same module reached through several paths (tied encoder/decoder layers) is fine: it
        # is replaced at every path. Anything else sharing the storage is not.
        # Blocks tied to each other (every fused tensor the same Parameter, as diffusion_gemma's
        # encoder/decoder) are defused together and keep sharing their per-expert Parameters.
        tied = [p for p in plans if _tie_key(p) == _tie_key(plan)]
        own = {f"{alias}.{name}" for p in tied for alias, _, _ in p.aliases for name in p.layout.fused_names}
        for name in plan.layout.fused_names:
            tensor = fused_tensor(plan.module, name)
            full = f"{plan.path}.{name}"
            others = [n for n in owners.get(id(tensor), []) if n not in own]
            key = _storage_key(tensor)
            others += [n for n in storages.get(key, []) if n not in own and key is not None]
            if others:
                raise SharedStorageError(
                    f"{full} shares its storage with {sorted(set(others))[:3]}; defusing in place would change "
                    "them too. Untie these tensors (clone one side) or exclude this block with a '-:' filter rule."
                )


def plan_conversion(
    model: nn.Module, rules: FilterRules, max_layers: int | None, report: ConversionReport
) -> list[BlockPlan]:
    """Find every fused experts block to convert; validates all of them before anything changes."""
    fallback_type = getattr(getattr(model, "config", None), "model_type", None)
    modules = dict(model.named_modules())
    all_paths: dict[int, list[str]] = {}
    for alias, module in model.named_modules(remove_duplicate=False):
        all_paths.setdefault(id(module), []).append(alias)
    plans: list[BlockPlan] = []
    for path, module in modules.items():
        if isinstance(module, DefusedExperts):
            report.skipped.append(
                BlockRecord(path, module.fused_class.__name__, module.layout.describe(), len(module), "skipped", "already defused")
            )
            continue
        layout = layout_of(module)
        if layout is None:
            continue
        reason = ""
        if not rules.allows(path):
            reason = "excluded by filter"
        elif max_layers is not None and (idx := _layer_index(path)) is not None and idx >= max_layers:
            reason = f"beyond max_layers={max_layers}"
        if reason:
            report.skipped.append(BlockRecord(path, type(module).__name__, layout.describe(), 0, "skipped", reason))
            continue
        shapes = check_shapes(module, layout, path)
        parent_path, _, attr = path.rpartition(".")
        aliases = []
        for alias in all_paths[id(module)]:
            alias_parent, _, alias_attr = alias.rpartition(".")
            aliases.append((alias, model.get_submodule(alias_parent), alias_attr))
        plans.append(
            BlockPlan(
                path=path,
                parent=modules[parent_path],
                attr=attr,
                module=module,
                aliases=aliases,
                layout=layout,
                shapes=shapes,
                names=projection_names(_model_type_of(module, fallback_type), layout.has_gate, fallback_type),
                model_type=_model_type_of(module, fallback_type),
                top_model_type=fallback_type,
            )
        )
    _check_not_shared(model, plans)
    return plans


def build_defused(
    shell: nn.Module,
    layout: ExpertLayout,
    names: ProjectionNames,
    fused: dict[str, torch.Tensor],
    undo: list[Callable[[], None]],
) -> DefusedExperts:
    """Carve ``fused`` tensors into per-expert Linears; registers in-place rewrites on ``undo``."""
    specs: dict[str, FusedTensorSpec] = {}
    carved: dict[str, list[list[torch.Tensor]]] = {}
    for tensor_name, pieces in pieces_fns(layout).items():
        tensor = fused[tensor_name]
        relayout = tensor.device.type != "meta" and needs_relayout(tensor, pieces)
        if relayout and not tensor.is_contiguous():
            tensor.data = tensor.data.contiguous()  # rare: a non-contiguous fused tensor; copy once
        carved[tensor_name] = carve(tensor, pieces, relayout)
        if relayout:
            undo.append(lambda t=tensor, p=pieces: [restore_slab(t[e], p) for e in range(t.shape[0])])
        specs[tensor_name] = FusedTensorSpec(
            tensor_name,
            tuple(tensor.shape),
            relayout,
            tensor.requires_grad,
            isinstance(tensor, torch.Tensor) and not isinstance(tensor, nn.Parameter),
        )
    gate_fn = GateFunction(shell, layout)
    in_name, bias_in = layout.in_proj, f"{layout.in_proj}_bias"
    in_roles = [names.gate, names.up] if layout.has_gate else [names.up]
    num_experts = next(iter(fused.values())).shape[0]
    experts = []
    for e in range(num_experts):
        projections = {}
        for k, role_name in enumerate(in_roles):
            bias = carved[bias_in][e][k] if layout.has_bias else None
            projections[role_name] = fast_linear(carved[in_name][e][k], bias, specs[in_name].requires_grad)
        down_bias = carved["down_proj_bias"][e][0] if layout.has_bias else None
        projections[names.down] = fast_linear(carved["down_proj"][e][0], down_bias, specs["down_proj"].requires_grad)
        experts.append(DefusedExpert(names, projections, gate_fn))
    return DefusedExperts(shell, layout, names, experts, specs)


def _detach_fused(module: nn.Module, layout: ExpertLayout, undo: list[Callable[[], None]]) -> dict[str, torch.Tensor]:
    """Remove the fused tensors from ``module`` (restored by ``undo``) and return them."""
    fused = {}
    for name in layout.fused_names:
        store = module._parameters if name in module._parameters else module._buffers
        fused[name] = store.pop(name)
        undo.append(lambda s=store, n=name, t=fused[name]: s.__setitem__(n, t))
    return fused


def _tied_copy(leader: DefusedExperts, shell: nn.Module) -> DefusedExperts:
    """A block for ``shell`` whose Linears hold the very Parameters of ``leader``'s Linears."""
    gate_fn = GateFunction(shell, leader.layout)
    experts = []
    for expert in leader:
        projections = {}
        for name in leader.names.as_tuple():
            source = getattr(expert, name)
            projections[name] = fast_linear(source.weight, source.bias, source.weight.requires_grad)
            projections[name]._parameters.update(source._parameters)  # share, not copy
        experts.append(DefusedExpert(leader.names, projections, gate_fn))
    return DefusedExperts(shell, leader.layout, leader.names, experts, leader.specs)


def _defuse_block(plan: BlockPlan, undo: list[Callable[[], None]], tied_to: DefusedExperts | None) -> BlockRecord:
    from .offload import materialize_offloaded, rehook_offloaded

    hook_state = materialize_offloaded(plan.module, plan.layout, undo)
    fused = _detach_fused(plan.module, plan.layout, undo)
    zero_copy = not any(
        t.device.type != "meta" and needs_relayout(t, fn) for (n, t), fn in zip(fused.items(), pieces_fns(plan.layout).values())
    )
    nbytes = sum(t.numel() * t.element_size() for t in fused.values())
    if tied_to is not None:
        defused = _tied_copy(tied_to, plan.module)
    else:
        defused = build_defused(plan.module, plan.layout, plan.names, fused, undo)
    rehook_offloaded(defused, hook_state)
    for _, parent, attr in plan.aliases:
        setattr(parent, attr, defused)
        undo.append(lambda p=parent, a=attr: setattr(p, a, plan.module))
    record = BlockRecord(
        plan.path, type(plan.module).__name__, plan.layout.describe(), plan.shapes.num_experts, "defused",
        zero_copy=zero_copy, expert_bytes=nbytes, model_type=plan.model_type,
        stock_loads_per_expert=stock_loads_per_expert(plan.model_type, plan.top_model_type),
    )
    return record, defused


def convert_model(
    model: nn.Module,
    filter: str | Iterable[str] | FilterRules | None = None,
    max_layers: int | None = None,
    *,
    show_progress: bool | None = None,
) -> ConversionReport:
    """Defuse every fused experts block of ``model`` in place.

    Args:
        model: any ``nn.Module`` (usually a Transformers ``PreTrainedModel``).
        filter: rules over full module paths: ``"+:regex"`` include, ``"-:regex"`` exclude,
            bare regex include; exclusion wins.
        max_layers: only convert blocks in decoder layers with index below this.
        show_progress: force the progress bar on/off (default: on for more than 8 blocks).

    Returns:
        A ``ConversionReport`` (truthy when at least one block was converted).

    The call is transactional: every block is validated before anything changes, and a failure
    while converting restores the model exactly as it was. Converting twice is a no-op.
    """
    rules = FilterRules.parse(filter)
    report = ConversionReport()
    plans = plan_conversion(model, rules, max_layers, report)
    undo: list[Callable[[], None]] = []
    try:
        with torch.no_grad():
            leaders: dict[tuple[int, ...], DefusedExperts] = {}
            for plan in progress(plans, "defuse", show_progress):
                key = _tie_key(plan)
                record, defused = _defuse_block(plan, undo, leaders.get(key))
                leaders.setdefault(key, defused)
                report.converted.append(record)
    except BaseException as exc:
        with torch.no_grad():
            for step in reversed(undo):
                step()
        if isinstance(exc, DefuserQuantError) or not isinstance(exc, Exception):
            raise
        raise ConversionError(
            f"defusing failed ({type(exc).__name__}: {exc}); the model was restored to its state before the call"
        ) from exc
    logger.info("defused %d block(s), %d experts", len(report.converted), report.num_experts)
    fused_only = sorted({r.model_type or r.class_name for r in report.converted if not r.stock_loads_per_expert})
    if fused_only:
        logger.warning(
            "stock Transformers loads %s checkpoints only in the fused layout: save with "
            "`with defuser_quant.temporarily_fused(model): model.save_pretrained(...)` for a checkpoint it loads",
            ", ".join(fused_only),
        )
    return report
