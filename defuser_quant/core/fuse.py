"""Re-fuse ``DefusedExperts`` back into the native Transformers experts classes (and split dense
MLPs back into one ``gate_up_proj``).

When the per-expert weights are still the views ``convert_model`` carved (nothing replaced
them), the fused tensors are rebuilt on the same storage without a copy, and any in-place
relayout is undone, so defuse -> fuse is bit-identical. Otherwise (weights loaded per expert,
moved, or edited) each fused tensor is allocated once and filled expert by expert.
Quantized projections cannot be re-fused here: the integrations own those formats.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .defused import DefusedExperts
from .dense import DENSE_LAYOUT, check_fusable_dense, fuse_dense_mlp, is_split
from .errors import FuseError
from .progress import progress
from .report import BlockRecord, ConversionReport
from .slicing import carve, expected_views, restore_slab
from .tensors import get_tensor, pop_tensor, put_tensor
from .transaction import all_or_nothing

logger = logging.getLogger(__name__)


def _expected_shapes(block: DefusedExperts, spec, plan) -> list[tuple[int, ...]]:
    """The shape of each piece one expert contributes to the fused tensor ``spec``."""
    shape = spec.shape if spec.plan is not None else (block.num_experts, *spec.shape[1:])
    return [tuple(p.shape) for p in plan.pieces(torch.empty(shape[1:], device="meta"))]


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _nonzero(t: torch.Tensor) -> bool:
    """True unless ``t`` is known to be all zeros (a meta tensor's values are unknown)."""
    return t.device.type == "meta" or bool(torch.count_nonzero(t.detach()).item())


def _pieces_per_expert(block: DefusedExperts, path: str) -> dict[str, list[list[torch.Tensor]]]:
    """Per fused tensor path, the list (per expert) of its current per-expert tensors.

    Validates everything the fused layout must represent and raises ``FuseError`` naming the
    module and the difference: a replaced or missing projection, a weight or bias of another
    shape, a bias the fused class has no place for (unless it is all zeros), a missing bias it
    needs, or experts that disagree on dtype or device.
    """
    names = block.names
    plans = block.tensor_plans()
    fused_name = block.fused_class.__name__
    stored = {(role, kind) for _, plan in plans for role, kind in plan.leaves}
    expected = {spec.name: _expected_shapes(block, spec, plan) for spec, plan in plans}
    out: dict[str, list[list[torch.Tensor]]] = {spec.name: [] for spec, _ in plans}
    reference: dict[str, tuple[str, torch.Tensor]] = {}  # per fused tensor: its first piece
    for index in range(block.num_experts):
        expert = block._modules.get(str(index))
        if expert is None:
            raise FuseError(f"{path}: expert {index} is missing; the block is partially converted and cannot be re-fused")
        linears = {}
        for role in ("gate", "up", "down"):
            if getattr(names, role) is None:
                continue
            where = f"{path}.{index}.{getattr(names, role)}"
            linear = linears[role] = expert.projection(role)
            if type(linear) is not nn.Linear:
                raise FuseError(
                    f"{where} is a {type(linear).__name__}, not nn.Linear: quantized "
                    "or replaced experts are re-fused by the quantizer integrations (see the README, 'Re-fusing')."
                )
            if linear.bias is not None and (role, "bias") not in stored and _nonzero(linear.bias):
                raise FuseError(
                    f"{where} has a bias, but the fused {fused_name} stores none: re-fusing would drop it. "
                    "Fold the bias elsewhere or keep the model defused."
                )
        for spec, plan in plans:
            current = []
            for (role, kind), shape in zip(plan.leaves, expected[spec.name]):
                where = f"{path}.{index}.{getattr(names, role)}.{kind}"
                tensor = getattr(linears[role], kind)
                if tensor is None:
                    raise FuseError(
                        f"{where} is missing, but the fused {fused_name} stores one of shape {_fmt(shape)}: "
                        "give the Linear its bias back (zeros if it has none) before fuse_model."
                    )
                if tuple(tensor.shape) != shape:
                    raise FuseError(
                        f"{where} has shape {_fmt(tuple(tensor.shape))}; the fused {fused_name} needs {_fmt(shape)} "
                        "(resized experts cannot be re-fused)."
                    )
                first_where, first = reference.setdefault(spec.name, (where, tensor))
                if tensor.dtype != first.dtype or tensor.device != first.device:
                    raise FuseError(
                        f"{where} is {tensor.dtype} on {tensor.device} but {first_where} is {first.dtype} on "
                        f"{first.device}: move the model to one dtype and device before fuse_model."
                    )
                current.append(tensor)
            out[spec.name].append(current)
    return out


def _try_alias(pieces: list[list[torch.Tensor]], shape: tuple[int, ...], fn: Callable, relayout: bool) -> torch.Tensor | None:
    """The fused tensor rebuilt on the storage the pieces already share, or None."""
    first = pieces[0][0]
    if first.device.type == "meta":
        return None
    probe = torch.empty(shape, dtype=first.dtype, device="meta")
    rel = expected_views(probe, fn, relayout)
    base_offset = first.storage_offset() - rel[0][0][0]
    if base_offset < 0:
        return None
    storage = first.untyped_storage()
    for expert_pieces, expected in zip(pieces, rel):
        for t, (offset, size, stride) in zip(expert_pieces, expected):
            if (
                t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.storage_offset() != base_offset + offset
                or tuple(t.shape) != size
                or tuple(t.stride()) != stride
                or t.dtype != first.dtype
            ):
                return None
    needed = (base_offset + probe.numel()) * first.element_size()
    if storage.nbytes() < needed:
        return None
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, base_offset, shape, probe.stride())


def _stack(pieces: list[list[torch.Tensor]], shape: tuple[int, ...], fn: Callable) -> torch.Tensor:
    first = pieces[0][0]
    for expert_pieces in pieces:
        for t in expert_pieces:
            if t.dtype != first.dtype or t.device != first.device:
                raise FuseError(
                    f"experts disagree on dtype/device ({first.dtype}/{first.device} vs {t.dtype}/{t.device}); "
                    "move the model to one dtype and device before fuse_model"
                )
    fused = torch.empty(shape, dtype=first.dtype, device=first.device)
    if first.device.type == "meta":
        return fused
    if len(pieces) < shape[0]:
        fused[len(pieces) :].zero_()  # slabs no expert holds (longcat_flash identity experts)
    for e, expert_pieces in enumerate(pieces):
        for dst, src in zip(fn(fused[e]), expert_pieces):
            if tuple(dst.shape) != tuple(src.shape):
                raise FuseError(f"expert {e}: tensor of shape {tuple(src.shape)} where {tuple(dst.shape)} was expected")
            dst.copy_(src)
    return fused


def _stacked_grad(pieces: list[list[torch.Tensor]], shape: tuple[int, ...], fn: Callable) -> torch.Tensor | None:
    """The per-expert ``.grad`` values as one fused gradient (zeros for experts without one, as
    autograd leaves experts no token reached); None when no piece has a gradient."""
    grads = [[p.grad for p in expert] for expert in pieces]
    if all(g is None for expert in grads for g in expert):
        return None
    filled = [[g if g is not None else torch.zeros_like(p) for g, p in zip(ge, pe)] for ge, pe in zip(grads, pieces)]
    return _stack(filled, shape, fn)


def _fuse_block(
    path: str, block: DefusedExperts, per_name: dict[str, list[list[torch.Tensor]]], memo: dict[int, torch.Tensor],
    undo: list[Callable[[], None]],
) -> tuple[nn.Module, bool]:
    """Rebuild ``block``'s native module from its validated pieces; in-place changes go on ``undo``.
    ``memo`` maps a first per-expert Parameter to the fused tensor already rebuilt from it, so
    blocks tied to each other get the same fused Parameter."""
    shell = block.fused_shell
    rebuilt, zero_copy = {}, True
    for spec, plan in block.tensor_plans():
        pieces = per_name[spec.name]
        if id(pieces[0][0]) in memo:
            rebuilt[spec.name] = memo[id(pieces[0][0])]
            continue
        shape = spec.shape if spec.plan is not None else (block.num_experts, *spec.shape[1:])
        fused = _try_alias(pieces, shape, plan.pieces, spec.relayout)
        if fused is not None and spec.relayout:
            for e in range(len(pieces)):
                restore_slab(fused[e], plan.pieces)
            undo.append(lambda t=fused[: len(pieces)], fn=plan.pieces: carve(t, fn, relayout=True))  # packed again
        if fused is None:
            zero_copy = False
            fused = _stack(pieces, shape, plan.pieces)
        grad = _stacked_grad(pieces, shape, plan.pieces)
        if spec.native_shape is not None:
            fused = fused.view(spec.native_shape)
            grad = grad.view(spec.native_shape) if grad is not None else None
        if not spec.is_buffer:
            fused = nn.Parameter(fused, requires_grad=spec.requires_grad)
            fused.grad = grad
        rebuilt[spec.name] = memo[id(pieces[0][0])] = fused
    for name, fused in rebuilt.items():
        kept = get_tensor(shell, name)  # the original, under cleanup_original=False
        put_tensor(shell, name, fused, block.specs[name].is_buffer)
        if kept is None:
            undo.append(lambda n=name: pop_tensor(shell, n))
        else:
            undo.append(lambda n=name, t=kept: put_tensor(shell, n, t, block.specs[n].is_buffer))
    first = next(iter(rebuilt.values()))
    if first.device.type != "meta":
        shell.to(first.device)
    return shell, zero_copy


def fuse_model(model: nn.Module, *, show_progress: bool | None = None) -> ConversionReport:
    """Re-fuse every ``DefusedExperts`` of ``model`` into its native experts class, in place.

    Transactional like ``convert_model``: every block is validated first, and ``FuseError``
    (naming the module and what the fused layout cannot represent: a quantized or replaced
    projection, a missing expert, a resized weight, an added bias, mixed dtypes) is raised before
    anything changes; a failure half way restores the model. Returns a ``ConversionReport``.
    """
    report = ConversionReport()
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, DefusedExperts)]
    pieces = {path: _pieces_per_expert(block, path) for path, block in blocks}  # validate all first
    dense = [(p, m) for p, m in model.named_modules() if is_split(m)]
    for path, mlp in dense:
        check_fusable_dense(mlp, path)
    aliases: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(path)
    memo: dict[int, torch.Tensor] = {}
    undo: list[Callable[[], None]] = []
    with all_or_nothing(undo, FuseError, "re-fusing"):
        for path, block in progress(blocks, "fuse", show_progress):
            shell, zero_copy = _fuse_block(path, block, pieces[path], memo, undo)
            for alias in aliases[id(block)]:  # a block shared by several parents is restored in all
                parent_path, _, attr = alias.rpartition(".")
                parent = model.get_submodule(parent_path)
                setattr(parent, attr, shell)
                undo.append(lambda p=parent, a=attr, b=block: setattr(p, a, b))
            report.converted.append(
                BlockRecord(path, type(shell).__name__, block.layout.describe(), block.num_experts, "fused", zero_copy=zero_copy)
            )
        for path, mlp in dense:
            zero_copy = fuse_dense_mlp(mlp, path, undo)
            report.converted.append(
                BlockRecord(path, type(mlp).__name__, DENSE_LAYOUT, 0, "fused", zero_copy=zero_copy, kind="dense_mlp")
            )
    logger.info("re-fused %d block(s), %d dense MLP(s)", len(report.experts_blocks), len(report.dense_mlps))
    return report


@contextmanager
def temporarily_fused(model: nn.Module) -> Iterator[ConversionReport]:
    """Re-fuse ``model`` for the duration of the block, then defuse it again.

    Both directions are zero-copy for weights ``convert_model`` carved, so this is the cheap
    way to ``save_pretrained`` the native fused layout (for families whose stock loader reads
    only fused checkpoints) or to run the fused kernels, and carry on with the defused model.
    """
    from .defuse import convert_model

    paths = [p for p, m in model.named_modules() if isinstance(m, DefusedExperts) or is_split(m)]
    # Blocks converted with cleanup_original=False come back that way (their fused tensors readable).
    kept = {p for p, m in model.named_modules() if isinstance(m, DefusedExperts) and _keeps_original(m)}
    report = fuse_model(model)
    try:
        yield report
    finally:
        for cleanup, group in ((True, [p for p in paths if p not in kept]), (False, sorted(kept))):
            if group:
                convert_model(model, filter=[f"+:^{re.escape(p)}$" for p in group], cleanup_original=cleanup)


def _keeps_original(block: DefusedExperts) -> bool:
    """True for a block converted with ``cleanup_original=False`` (its shell still holds the fused tensors)."""
    return any(get_tensor(block.fused_shell, name) is not None for name in block.specs)
