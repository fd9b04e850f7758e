"""After-load conversion: fused experts blocks -> ``DefusedExperts`` in place, transactionally."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .defused import DefusedExperts, FusedTensorSpec, fast_linear
from .dense import DENSE_LAYOUT, DensePlan, check_dense, dense_entry, is_split, split_dense_mlp
from .errors import ConversionError, SharedStorageError
from .families import adapter_of, experts_entry_for
from .filters import FilterRules
from .irregular.base import StandardAdapter
from .layout import ExpertLayout, ExpertShapes
from .naming import ProjectionNames, stock_loads_per_expert
from .progress import progress
from .report import BlockRecord, ConversionReport
from .slicing import carve, down_pieces, in_bias_pieces, in_proj_pieces, needs_relayout, restore_slab, whole_slab
from .tensors import FusedTensor, get_tensor, layout_tensors, pop_tensor
from .transaction import all_or_nothing

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
    adapter: StandardAdapter = None  # type: ignore[assignment]
    tensors: list[FusedTensor] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.adapter is None:
            self.adapter = STANDARD
        if self.tensors is None:
            self.tensors = layout_tensors(self.layout)

    @property
    def tensor_paths(self) -> tuple[str, ...]:
        """Attribute paths (inside the fused module) of every fused tensor of the block."""
        return tuple(t.path for t in self.tensors)


STANDARD = StandardAdapter()


def adapter_for_class(cls: type) -> StandardAdapter:
    """The adapter of an experts class (its family entry's, else the standard one)."""
    entry = experts_entry_for(cls)
    return adapter_of(entry) if entry is not None else STANDARD


def adapter_for(module: nn.Module) -> StandardAdapter | None:
    """The adapter that defuses ``module``: its explicit family entry, else the standard one for
    decorated classes; None when ``module`` is no fused experts block."""
    entry = experts_entry_for(type(module))
    if entry is not None:
        adapter = adapter_of(entry)
        return adapter if adapter.applies(module) else None
    return STANDARD if STANDARD.applies(module) else None


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
    return tuple(id(get_tensor(plan.module, name)) for name in plan.tensor_paths)


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
        own = {f"{alias}.{name}" for p in tied for alias, _, _ in p.aliases for name in p.tensor_paths}
        for name in plan.tensor_paths:
            tensor = get_tensor(plan.module, name)
            full = f"{plan.path}.{name}"
            others = [n for n in owners.get(id(tensor), []) if n not in own]
            key = _storage_key(tensor)
            others += [n for n in storages.get(key, []) if n not in own and key is not None]
            if others:
                raise SharedStorageError(
                    f"{full} shares its storage with {sorted(set(others))[:3]}; defusing in place would change "
                    "them too. Untie these tensors (clone one side) or exclude this block with a '-:' filter rule."
                )


def _skip_reason(path: str, rules: FilterRules, max_layers: int | None) -> str:
    if not rules.allows(path):
        return "excluded by filter"
    if max_layers is not None and (idx := _layer_index(path)) is not None and idx >= max_layers:
        return f"beyond max_layers={max_layers}"
    return ""


def plan_dense(model: nn.Module, rules: FilterRules, max_layers: int | None, report: ConversionReport) -> list[DensePlan]:
    """Every fused dense ``gate_up_proj`` MLP to split (validated; nothing changes)."""
    plans = []
    for path, module in model.named_modules():
        if is_split(module):
            report.skipped.append(BlockRecord(path, type(module).__name__, DENSE_LAYOUT, 0, "skipped", "already split", kind="dense_mlp"))
            continue
        entry = dense_entry(module)
        if entry is None:
            continue
        reason = _skip_reason(path, rules, max_layers)
        if reason:
            report.skipped.append(BlockRecord(path, type(module).__name__, DENSE_LAYOUT, 0, "skipped", reason, kind="dense_mlp"))
            continue
        check_dense(module, path)
        plans.append(DensePlan(path, module, entry))
    return plans


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
        adapter = adapter_for(module)
        if adapter is None:
            continue
        layout = adapter.layout(module)
        reason = _skip_reason(path, rules, max_layers)
        if reason:
            report.skipped.append(BlockRecord(path, type(module).__name__, adapter.describe(layout), 0, "skipped", reason))
            continue
        shapes = adapter.check(module, layout, path)
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
                names=adapter.names(layout, _model_type_of(module, fallback_type), fallback_type),
                model_type=_model_type_of(module, fallback_type),
                top_model_type=fallback_type,
                adapter=adapter,
                tensors=adapter.tensors(module, layout),
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
    *,
    tensors: list[FusedTensor] | None = None,
    adapter: StandardAdapter | None = None,
    keep_fused: bool = False,
) -> DefusedExperts:
    """Carve ``fused`` tensors (keyed by path) into per-expert Linears; registers in-place rewrites
    on ``undo``. ``tensors`` and ``adapter`` default to the standard layout's.

    ``keep_fused``: leave the fused storage in its native layout (pieces that are no contiguous
    view of it are copied instead of relaid out in place). A fused tensor's ``.grad`` is carried
    into the per-expert Parameters (views of it where the pieces are, copies otherwise).
    """
    adapter = adapter or STANDARD
    tensors = tensors if tensors is not None else layout_tensors(layout)
    specs: dict[str, FusedTensorSpec] = {}
    parts: dict[int, dict[str, dict[str, torch.Tensor]]] = {}  # expert -> role -> weight/bias
    grads: dict[int, dict[str, dict[str, torch.Tensor]]] = {}  # the same, for carried .grad
    for plan in tensors:
        tensor = fused[plan.path]
        # Carve the detached data: an in-place relayout of a Parameter that requires grad is an
        # autograd error when grad mode is on (a model built under the pre-load patch).
        slabs = plan.slabs(tensor.detach())
        count = plan.carved_experts or slabs.shape[0]
        relayout = tensor.device.type != "meta" and needs_relayout(slabs, plan.pieces)
        if relayout and keep_fused:
            carved = [[p.contiguous() for p in plan.pieces(slabs[e])] for e in range(count)]
            relayout = False
        else:
            if relayout and not tensor.is_contiguous():
                tensor.data = tensor.data.contiguous()  # rare: a non-contiguous fused tensor; copy once
                slabs = plan.slabs(tensor.detach())
            carved = carve(slabs[:count], plan.pieces, relayout)
        if relayout:
            undo.append(lambda t=slabs, p=plan.pieces, n=count: [restore_slab(t[e], p) for e in range(n)])
        for e, pieces in enumerate(carved):
            for (role, kind), piece in zip(plan.leaves, pieces):
                parts.setdefault(e, {}).setdefault(role, {})[kind] = piece
        if tensor.grad is not None and tensor.grad.device.type != "meta":
            grad_slabs = plan.slabs(tensor.grad)
            for e in range(count):
                for (role, kind), piece in zip(plan.leaves, plan.pieces(grad_slabs[e])):
                    grads.setdefault(e, {}).setdefault(role, {})[kind] = piece.contiguous()
        specs[plan.path] = FusedTensorSpec(
            plan.path,
            tuple(slabs.shape),
            relayout,
            tensor.requires_grad,
            isinstance(tensor, torch.Tensor) and not isinstance(tensor, nn.Parameter),
            native_shape=tuple(tensor.shape) if plan.slab_shape is not None else None,
            plan=None if adapter is STANDARD else plan,
        )
    gate_fn = adapter.gate(shell, layout)
    requires_grad = {role: specs[p.path].requires_grad for p in tensors for role, _ in p.leaves}
    roles = [r for r in ("gate", "up", "down") if getattr(names, r) is not None]
    num_experts = min(p.carved_experts or specs[p.path].shape[0] for p in tensors)
    experts = []
    for e in range(num_experts):
        projections = {}
        for role in roles:
            leaf = parts[e][role]
            linear = projections[getattr(names, role)] = fast_linear(leaf["weight"], leaf.get("bias"), requires_grad[role])
            for kind, grad in grads.get(e, {}).get(role, {}).items():
                getattr(linear, kind).grad = grad
        experts.append(adapter.expert_class(names, projections, gate_fn))
    block = adapter.block_class(shell, layout, names, experts, specs)
    block.family = adapter.family
    return block


def _detach_fused(
    module: nn.Module, paths: Iterable[str], undo: list[Callable[[], None]], keep: bool = False
) -> dict[str, torch.Tensor]:
    """Remove the fused tensors at ``paths`` from ``module`` (restored by ``undo``) and return them;
    with ``keep`` they stay where they are (``cleanup_original=False``)."""
    if keep:
        return {path: get_tensor(module, path) for path in paths}
    fused = {}
    for path in paths:
        store, name, fused[path] = pop_tensor(module, path)
        undo.append(lambda s=store, n=name, t=fused[path]: s.__setitem__(n, t))
    return fused


def _tied_copy(leader: DefusedExperts, shell: nn.Module) -> DefusedExperts:
    """A block for ``shell`` whose Linears hold the very Parameters of ``leader``'s Linears."""
    gate_fn = leader[0].gate_fn.__class__(shell, leader.layout, leader[0].gate_fn.act) if len(leader) else None
    experts = []
    for expert in leader:
        projections = {}
        for name in leader.names.as_tuple():
            source = getattr(expert, name)
            projections[name] = fast_linear(source.weight, source.bias, source.weight.requires_grad)
            projections[name]._parameters.update(source._parameters)  # share, not copy
        experts.append(type(expert)(leader.names, projections, gate_fn))
    block = type(leader)(shell, leader.layout, leader.names, experts, leader.specs)
    block.family = leader.family
    return block


def _defuse_block(
    plan: BlockPlan, undo: list[Callable[[], None]], tied_to: DefusedExperts | None, keep_fused: bool = False
) -> tuple[BlockRecord, DefusedExperts]:
    from .offload import materialize_offloaded, rehook_offloaded

    hook_state = materialize_offloaded(plan.module, plan.tensor_paths, undo)
    fused = _detach_fused(plan.module, plan.tensor_paths, undo, keep=keep_fused)
    zero_copy = not any(
        fused[t.path].device.type != "meta" and needs_relayout(t.slabs(fused[t.path]), t.pieces) for t in plan.tensors
    )
    nbytes = sum(t.numel() * t.element_size() for t in fused.values())
    if tied_to is not None:
        defused = _tied_copy(tied_to, plan.module)
    else:
        defused = build_defused(
            plan.module, plan.layout, plan.names, fused, undo, tensors=plan.tensors, adapter=plan.adapter,
            keep_fused=keep_fused,
        )
    rehook_offloaded(defused, hook_state)
    for _, parent, attr in plan.aliases:
        setattr(parent, attr, defused)
        undo.append(lambda p=parent, a=attr: setattr(p, a, plan.module))
    record = BlockRecord(
        plan.path, type(plan.module).__name__, plan.adapter.describe(plan.layout), plan.shapes.num_experts, "defused",
        zero_copy=zero_copy, expert_bytes=nbytes, model_type=plan.model_type,
        stock_loads_per_expert=plan.adapter.stock_per_expert and stock_loads_per_expert(plan.model_type, plan.top_model_type),
    )
    return record, defused


def _in_training(plans: list[BlockPlan]) -> list[str]:
    """Paths of the fused Parameters that are being trained: requiring grad, in a module in
    training mode or holding a gradient (an eval-mode model without gradients is not trained)."""
    out = []
    for plan in plans:
        for name in plan.tensor_paths:
            tensor = get_tensor(plan.module, name)
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad and (plan.module.training or tensor.grad is not None):
                out.append(f"{plan.path}.{name}")
    return out


def _warn_if_training(replaced: list[str]) -> None:
    """One warning when trained fused Parameters were replaced: an optimizer made before the
    call would not see the per-expert ones."""
    if replaced:
        logger.warning(
            "convert_model replaced %d trainable fused expert Parameter(s) (%s%s) with per-expert Parameters "
            "(any .grad is carried over): an optimizer created before the conversion still holds the old ones and "
            "would never update the experts. Create the optimizer after convert_model.",
            len(replaced), ", ".join(replaced[:2]), ", ..." if len(replaced) > 2 else "",
        )


def convert_model(
    model: nn.Module,
    filter: str | Iterable[str] | FilterRules | bool | None = None,
    max_layers: int | None = None,
    *,
    cleanup_original: bool | None = None,
    split_dense: bool = True,
    show_progress: bool | None = None,
) -> ConversionReport:
    """Defuse every fused experts block of ``model`` in place.

    Args:
        model: any ``nn.Module`` (usually a Transformers ``PreTrainedModel``).
        filter: rules over full module paths: ``"+:regex"`` include, ``"-:regex"`` exclude,
            bare regex include; exclusion wins. A bool here is Defuser's positional
            ``cleanup_original`` (``convert_model(model, False)``).
        max_layers: only convert blocks in decoder layers with index below this.
        cleanup_original: True (default): the fused tensors go; the per-expert weights are views
            of their storage. False: they stay readable (``block.gate_up_proj``, the original
            Parameters) and share storage with the per-expert weights where the layout allows;
            transposed/interleaved layouts get per-expert copies instead of an in-place relayout.
        split_dense: also split dense MLPs with a fused ``gate_up_proj`` ``nn.Linear`` (phi3,
            glm, ...) into ``gate_proj``/``up_proj`` (on by default, as Defuser does).
        show_progress: force the progress bar on/off (default: on for more than 8 blocks).

    Returns:
        A ``ConversionReport`` (truthy when at least one block was converted).

    The call is transactional: every block is validated before anything changes, and a failure
    while converting restores the model exactly as it was. Converting twice is a no-op. A fused
    Parameter's ``.grad`` is carried into the per-expert Parameters; an optimizer built before the
    call still holds the old fused Parameters (one warning says so when the model is training).
    """
    if isinstance(filter, bool):  # Defuser's signature: convert_model(model, cleanup_original, ...)
        if cleanup_original is not None:
            raise TypeError("convert_model() got cleanup_original both as the second argument and by keyword")
        filter, cleanup_original = None, filter
    if cleanup_original is None:
        cleanup_original = True
    if not isinstance(cleanup_original, bool):
        raise TypeError(f"convert_model(cleanup_original=...) takes True or False, not {cleanup_original!r}")
    if max_layers is not None and (isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1):
        raise ValueError(f"convert_model(max_layers=...) takes a positive layer count or None, not {max_layers!r}")
    rules = FilterRules.parse(filter)
    report = ConversionReport()
    plans = plan_conversion(model, rules, max_layers, report)
    dense_plans = plan_dense(model, rules, max_layers, report) if split_dense else []
    trained = _in_training(plans) + [
        f"{d.path}.gate_up_proj.{n}"
        for d in dense_plans
        for n, t in d.mlp.gate_up_proj.named_parameters()
        if t.requires_grad and (d.mlp.training or t.grad is not None)
    ]
    undo: list[Callable[[], None]] = []
    with all_or_nothing(undo, ConversionError, "defusing"):
        leaders: dict[tuple[int, ...], DefusedExperts] = {}
        for plan in progress(plans, "defuse", show_progress):
            key = _tie_key(plan)
            record, defused = _defuse_block(plan, undo, leaders.get(key), keep_fused=not cleanup_original)
            leaders.setdefault(key, defused)
            report.converted.append(record)
        for dense in dense_plans:
            split_dense_mlp(dense.mlp, dense.entry.gate_first, undo)
            report.converted.append(
                BlockRecord(
                    dense.path, type(dense.mlp).__name__, DENSE_LAYOUT, 0, "defused",
                    model_type=_model_type_of(dense.mlp, getattr(getattr(model, "config", None), "model_type", None)),
                    stock_loads_per_expert=False, kind="dense_mlp",
                )
            )
    _warn_if_training(trained)
    logger.info(
        "defused %d block(s), %d experts; split %d dense MLP(s)",
        len(report.experts_blocks), report.num_experts, len(report.dense_mlps),
    )
    fused_only = sorted({r.model_type or r.class_name for r in report.converted if not r.stock_loads_per_expert})
    if fused_only:
        logger.warning(
            "stock Transformers loads %s checkpoints only in the fused layout: save with "
            "`with defuser_quant.temporarily_fused(model): model.save_pretrained(...)` for a checkpoint it loads",
            ", ".join(fused_only),
        )
    return report
