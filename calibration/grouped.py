"""Grouped calibration forward: a block's experts through grouped GEMMs, per-expert hooks kept.

The per-expert loop (``DefusedExperts.routed_forward``) runs one small matmul per expert and
projection; on a GPU that bookkeeping, not the arithmetic, bounds calibration. Here a block's
tokens are sorted by expert once and each projection role (gate, up, down) runs as one
``grouped_mm`` over all experts, while every per-expert ``nn.Linear`` still has its hooks called
with exactly the rows it would have received in the loop, in the same row order:

* forward pre-hooks get ``(module, (rows,))`` and may replace the rows, as in ``Module.__call__``;
* forward hooks get ``(module, (rows,), output)`` and may replace the output;
* a registered :class:`LinearAdapter` adds the hook a non-``nn.Linear`` class calls inside its
  own forward (GPTQModel's ``HookedLinear``; ``defuser_quant.integrations.gptqmodel`` registers it);
* a registered :class:`ForwardWrapper` vouches for an instance ``forward`` a library installs on
  modules (compressed-tensors' quantization and offload wrappers;
  ``defuser_quant.integrations.llmcompressor`` registers them) when, for this input, it calls
  the class forward on the same rows and nothing else.

Only the projection outputs differ from the loop, by the rounding of a grouped versus a
per-expert GEMM (bit-equal on the CPU here), so Hessians built from the inputs agree within
float tolerance. What cannot be reproduced is refused: :func:`why_not_grouped` names the reason
and callers fall back to the per-expert loop. A block falls back when a projection is not a
plain ``nn.Linear`` (or a registered adapter) or carries an instance ``forward`` no registered
wrapper vouches for (quantization wrappers, activation observers, accelerate offload), or one
that is not plain for this input (e.g. activation quantization on), when any module has backward, keyword or
global hooks, when an expert module itself is hooked, under autocast or ``torch.compile``, when
weights differ in shape/dtype/device from each other or from the input, and for irregular
families (their blocks override the routed forward).

The routed combine adds each token's expert outputs in ascending expert order, one slot at a
time in the output dtype: the loop's ``index_add_`` order, without its atomics, so the result is
deterministic on CUDA too (``index_add_`` on CUDA is not). :func:`deterministic_mode` makes the
per-expert loop deterministic as well.
"""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules import module as _module

from defuser_quant.core.defused import DefusedExpert, DefusedExperts

__all__ = [
    "ForwardWrapper",
    "GroupedUse",
    "LinearAdapter",
    "deterministic_mode",
    "grouped_expert_calls",
    "grouped_routed_forward",
    "recording_grouped_use",
    "register_forward_wrapper",
    "register_linear_adapter",
    "unregister_forward_wrapper",
    "unregister_linear_adapter",
    "why_not_grouped",
]

logger = logging.getLogger(__name__)

_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class _Role:
    """One projection role of a block: its per-expert modules and their stacked weight/bias."""

    modules: list[nn.Module]
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class LinearAdapter:
    """How a Linear-like class behaves, for the grouped forward.

    ``is_plain(module, input)`` says whether the module's forward is ``F.linear`` plus hooks for
    this input (e.g. no input rounding, weight on the input's device; None: always);
    ``inner_hook(module, input, output)`` runs what the class's own forward runs after its
    matmul (None: nothing).
    """

    is_plain: Callable[[nn.Module, torch.Tensor], bool] | None = None
    inner_hook: Callable[[nn.Module, torch.Tensor, torch.Tensor], None] | None = None


_ADAPTERS: dict[type, LinearAdapter] = {nn.Linear: LinearAdapter()}


def register_linear_adapter(cls: type, adapter: LinearAdapter) -> None:
    """Let modules of exactly ``cls`` take part in the grouped forward (see :class:`LinearAdapter`)."""
    _ADAPTERS[cls] = adapter


def unregister_linear_adapter(cls: type) -> None:
    """Undo :func:`register_linear_adapter` (``nn.Linear`` stays)."""
    if cls is not nn.Linear:
        _ADAPTERS.pop(cls, None)


@dataclass(frozen=True)
class ForwardWrapper:
    """An instance ``forward`` that a library installs on modules, for the grouped forward.

    ``why_not_plain(module, input)``: why, for this input, the wrapper does more than call the
    next function with the same rows and return its result unchanged (None: it does nothing more).
    ``inner(module, function)``: the next function the wrapper calls (another wrapper to check, or
    the class ``forward``), or None when it calls ``type(module).forward``. Which functions are this
    wrapper: those whose ``__code__`` is ``code`` (an exact, fast match: closures made by one factory
    share it), or for which ``matches(function)`` is true.
    """

    why_not_plain: Callable[[nn.Module, torch.Tensor], str | None]
    inner: Callable[[nn.Module, Callable], Callable | None]
    code: types.CodeType | None = None
    matches: Callable[[Callable], bool] | None = None

    def __post_init__(self) -> None:
        if self.code is None and self.matches is None:
            raise ValueError("ForwardWrapper needs code= or matches= to recognise its functions")


_WRAPPERS: dict[str, ForwardWrapper] = {}
_BY_CODE: dict[types.CodeType, ForwardWrapper] = {}
_MAX_WRAPPER_DEPTH = 8


def _index_wrappers() -> None:
    _BY_CODE.clear()
    _BY_CODE.update({w.code: w for w in _WRAPPERS.values() if w.code is not None})


def register_forward_wrapper(name: str, wrapper: ForwardWrapper) -> None:
    """Let modules whose instance ``forward`` is ``wrapper`` take part in the grouped forward."""
    _WRAPPERS[name] = wrapper
    _index_wrappers()


def unregister_forward_wrapper(name: str) -> None:
    """Undo :func:`register_forward_wrapper` (no-op when ``name`` is not registered)."""
    _WRAPPERS.pop(name, None)
    _index_wrappers()


def _wrapper_of(func: Callable) -> ForwardWrapper | None:
    wrapper = _BY_CODE.get(getattr(func, "__code__", None))
    if wrapper is None:
        wrapper = next((w for w in _WRAPPERS.values() if w.matches is not None and w.matches(func)), None)
    return wrapper


def _instance_forward_problem(m: nn.Module, x: torch.Tensor) -> str | None:
    """Why the module's instance ``forward`` (if any) is not its class forward on the same rows."""
    fn = m.__dict__.get("forward")
    if fn is None:
        return None
    class_forward = type(m).forward
    for _ in range(_MAX_WRAPPER_DEPTH):
        func = getattr(fn, "__func__", fn)
        if func is class_forward:
            return None
        wrapper = _wrapper_of(func)
        if wrapper is None:
            code = getattr(func, "__code__", None)  # functools.wraps copies the wrapped __qualname__; the code tells
            name = getattr(code, "co_qualname", None) or getattr(func, "__qualname__", type(func).__name__)
            return f"has an instance forward ({name}) no registered wrapper vouches for (a wrapper or offload hook)"
        problem = wrapper.why_not_plain(m, x)
        if problem:
            return problem
        fn = wrapper.inner(m, func)
        if fn is None:
            return None
    return f"has more than {_MAX_WRAPPER_DEPTH} nested forward wrappers"


@dataclass
class GroupedUse:
    """How often blocks ran grouped and why the others took the per-expert loop (see :func:`recording_grouped_use`)."""

    grouped: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)

    @property
    def loop(self) -> int:
        return sum(self.fallbacks.values())


_RECORDERS: list[GroupedUse] = []


@contextmanager
def recording_grouped_use() -> Iterator[GroupedUse]:
    """Count, inside the ``with`` block, the grouped block calls and the fallbacks by reason."""
    use = GroupedUse()
    _RECORDERS.append(use)
    try:
        yield use
    finally:
        _RECORDERS.remove(use)


def _record(reason: str | None) -> None:
    for use in _RECORDERS:
        if reason is None:
            use.grouped += 1
        else:
            use.fallbacks[reason] = use.fallbacks.get(reason, 0) + 1


def _grouped_mm(x: torch.Tensor, weight_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if hasattr(torch.nn.functional, "grouped_mm"):
        return torch.nn.functional.grouped_mm(x, weight_t, offs=offs)
    return torch._grouped_mm(x, weight_t, offs=offs)  # pragma: no cover - torch < 2.10


def _global_hooks() -> bool:
    names = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks", "_global_forward_hooks_with_kwargs")
    return any(bool(getattr(_module, n, None)) for n in names)


def _module_hook_problem(m: nn.Module, x: torch.Tensor) -> str | None:
    d = m.__dict__  # direct reads: this runs for every projection on every call
    if "forward" in d:
        problem = _instance_forward_problem(m, x)
        if problem:
            return problem
    if d["_backward_hooks"] or d["_backward_pre_hooks"]:
        return "has backward hooks"
    if d["_forward_pre_hooks_with_kwargs"] or d["_forward_hooks_with_kwargs"]:
        return "has forward hooks with kwargs"
    return None


def _projection(
    m: nn.Module | None, x: torch.Tensor, on_cuda: bool, device_index: int
) -> tuple[str | None, torch.Tensor | None, torch.Tensor | None]:
    """``(why not, weight, bias)`` of one projection: weight and bias read once (an offload cache
    onloads them on each read, as the module's forward would)."""
    if m is None:
        return "is missing", None, None
    adapter = _ADAPTERS.get(type(m))
    if adapter is None:
        return f"is a {type(m).__name__}, not a plain nn.Linear", None, None
    problem = _module_hook_problem(m, x)
    if problem:
        return problem, None, None
    params = m.__dict__["_parameters"]
    weight = params.get("weight")
    if (
        weight is None
        or weight.dtype is not x.dtype
        or weight.is_meta
        or weight.is_cuda is not on_cuda
        or weight.get_device() != device_index
        or (x.device.type not in ("cpu", "cuda") and weight.device != x.device)
        or weight.dim() != 2
    ):
        found = "no weight" if weight is None else f"weight {weight.dtype} on {weight.device}"
        return f"{found} does not match the input ({x.dtype} on {x.device})", None, None
    if adapter.is_plain is not None and not adapter.is_plain(m, x):
        return f"{type(m).__name__} forward is not plain for this input", None, None
    return None, weight, params.get("bias")


def _plan(block: DefusedExperts, hidden_states: torch.Tensor) -> tuple[list[_Role] | None, str | None]:
    """The block's projection roles with stacked weights, or why it cannot run grouped."""
    if type(block).routed_forward is not DefusedExperts.routed_forward or type(block).new_output is not DefusedExperts.new_output:
        return None, f"{type(block).__name__} has its own routed forward (irregular family)"
    if hidden_states.dim() != 2:
        return None, f"hidden_states is {hidden_states.dim()}-D, expected [tokens, hidden]"
    if not hasattr(torch.nn.functional, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
        return None, "this torch has no grouped_mm"
    on_cuda = hidden_states.is_cuda
    if on_cuda and (
        hidden_states.dtype != torch.bfloat16 or torch.cuda.get_device_capability(hidden_states.device) < (8, 0)
    ):
        return None, "grouped_mm on CUDA needs bf16 on compute capability 8.0 or newer"
    if torch.is_autocast_enabled(hidden_states.device.type):
        return None, "autocast is on"
    if torch.compiler.is_compiling():
        return None, "inside torch.compile"
    if _global_hooks():
        return None, "global module hooks are registered"
    names = block[0].names
    gate_fn = block[0].gate_fn
    device_index = hidden_states.get_device()
    sample = hidden_states[:0]
    roles = [r for r in _ROLES if getattr(names, r) is not None]
    role_names = [getattr(names, r) for r in roles]
    found: dict[str, tuple[list[nn.Module], list[torch.Tensor], list[torch.Tensor | None]]] = {r: ([], [], []) for r in roles}
    for e, expert in enumerate(block):
        if type(expert) is not DefusedExpert or expert.gate_fn is not gate_fn or expert.names != names:
            return None, f"expert {e} is a {type(expert).__name__} with its own forward or names"
        if expert._forward_pre_hooks or expert._forward_hooks:
            return None, f"expert {e} module itself is hooked"
        problem = _module_hook_problem(expert, sample)
        if problem:
            return None, f"expert {e} module {problem}"
        children = expert.__dict__["_modules"]
        for r, name in zip(roles, role_names):
            m = children.get(name)
            problem, weight, bias = _projection(m, sample, on_cuda, device_index)
            if problem:
                return None, f"expert {e} {r} projection {problem}"
            modules, weights, biases = found[r]
            modules.append(m)
            weights.append(weight)
            biases.append(bias)
    planned = []
    for r in roles:
        modules, weights, biases = found[r]
        shape, has_bias = weights[0].shape, biases[0] is not None
        for e, (w, b) in enumerate(zip(weights, biases, strict=True)):
            if w.shape != shape or (b is not None) != has_bias:
                return None, f"expert {e} {r} projection shape {tuple(w.shape)} (bias {b is not None}) differs from expert 0's"
        planned.append(_Role(modules, _stacked(weights), _stacked(biases) if has_bias else None))
    return planned, None


_REPORTED: set[tuple[str, str]] = set()


def _report_fallback(block: DefusedExperts, reason: str) -> None:
    """Say once per block class and kind of reason that the per-expert loop runs instead."""
    key = (type(block).__name__, re.sub(r"^expert \d+ ", "", reason))
    _record(key[1])
    if key not in _REPORTED:
        _REPORTED.add(key)
        logger.warning("grouped calibration forward not used for %s: %s; running the per-expert loop", *key)


def why_not_grouped(block: DefusedExperts, hidden_states: torch.Tensor) -> str | None:
    """Why ``block`` cannot run grouped on ``hidden_states`` (None: it can)."""
    return _plan(block, hidden_states)[1]


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``, as a zero-copy view when they are evenly spaced in one storage."""
    first = tensors[0]
    if len(tensors) > 1:
        storage = first.untyped_storage().data_ptr()
        step = tensors[1].storage_offset() - first.storage_offset()
        if step > 0 and all(
            t.untyped_storage().data_ptr() == storage
            and t.stride() == first.stride()
            and t.storage_offset() == first.storage_offset() + i * step
            for i, t in enumerate(tensors)
        ):
            return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack(tensors)


def _call_pre_hooks(m: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    for hook in tuple(m._forward_pre_hooks.values()):
        result = hook(m, (rows,))
        if result is not None:
            result = result if isinstance(result, tuple) else (result,)
            if len(result) != 1 or not isinstance(result[0], torch.Tensor) or result[0].shape != rows.shape:
                raise RuntimeError(
                    f"a forward pre-hook of {type(m).__name__} returned {type(result[0]).__name__} of another shape; "
                    "the grouped calibration forward keeps row counts (run without grouped=True)"
                )
            rows = result[0]
    return rows


def _call_post_hooks(m: nn.Module, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    adapter = _ADAPTERS[type(m)]
    if adapter.inner_hook is not None:
        adapter.inner_hook(m, rows, out)
    for hook in tuple(m._forward_hooks.values()):
        result = hook(m, (rows,), out)
        if result is not None:
            out = result
    return out


def _project(role: _Role, x: torch.Tensor, counts: list[int], offs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """One projection role over all experts: hooks per expert, one grouped GEMM."""
    modules = role.modules
    hit = [e for e, n in enumerate(counts) if n]
    rows = dict(zip(hit, torch.split(x, [counts[e] for e in hit]), strict=True))
    replaced = False
    for e in hit:
        m = modules[e]
        if m._forward_pre_hooks:
            new = _call_pre_hooks(m, rows[e])
            replaced |= new is not rows[e]
            rows[e] = new
    if replaced:
        x = torch.cat([rows[e] for e in hit])
    out = _grouped_mm(x, role.weight.transpose(-2, -1), offs)
    if role.bias is not None:
        out = out + role.bias[expert_ids]
    outs = dict(zip(hit, torch.split(out, [counts[e] for e in hit]), strict=True))
    changed = False
    for e in hit:
        new = _call_post_hooks(modules[e], rows[e], outs[e])
        changed |= new is not outs[e]
        outs[e] = new
    return torch.cat([outs[e] for e in hit]) if changed else out


def _run_sorted(block: DefusedExperts, roles: list[_Role], x: torch.Tensor, counts: list[int], expert_ids: torch.Tensor) -> torch.Tensor:
    """Expert outputs for rows ``x`` sorted by expert (``counts`` rows each), grouped."""
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    gate = _project(roles[0], x, counts, offs, expert_ids) if len(roles) == 3 else None
    up = _project(roles[-2], x, counts, offs, expert_ids)
    return _project(roles[-1], block[0].gate_fn(gate, up), counts, offs, expert_ids)


def grouped_routed_forward(
    block: DefusedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor | None:
    """``block.routed_forward`` through grouped GEMMs; None when the block cannot (see :func:`why_not_grouped`).

    Each expert's projections see the rows of the loop in the loop's order (top-k slot, then
    token); the combine adds in ascending expert order like the loop's ``index_add_``.
    """
    roles, reason = _plan(block, hidden_states)
    if roles is None:
        _report_fallback(block, reason)
        return None
    tokens, top_k = top_k_index.shape
    if tokens == 0 or top_k == 0:
        _record("no routed tokens in this batch")
        return None
    num_experts = block.num_experts
    # Flat index k * tokens + t: a stable sort by expert keeps the loop's (slot, token) order.
    flat_ids = top_k_index.T.reshape(-1)
    expert_ids, perm = torch.sort(flat_ids, stable=True)
    # One host sync for the counts and the range check.
    stats = torch.cat([torch.bincount(expert_ids.clamp(0, num_experts - 1), minlength=num_experts), expert_ids[[0, -1]]])
    *counts, low, high = stats.tolist()
    if low < 0 or high >= num_experts:
        logger.debug("grouped forward off: expert indices outside [0, %d)", num_experts)
        _record(f"expert indices outside [0, {num_experts})")
        return None
    _record(None)
    token_idx = perm % tokens
    slot_idx = perm // tokens
    out = _run_sorted(block, roles, hidden_states[token_idx], counts, expert_ids)
    weighted = out * top_k_weights[token_idx, slot_idx, None]
    final = block.new_output(hidden_states)
    # Row of each (token, j-th smallest expert id) in the sorted order.
    position = torch.empty_like(perm)
    position[perm] = torch.arange(perm.numel(), device=perm.device)
    slot_order = torch.sort(top_k_index, dim=1, stable=True).indices  # [tokens, top_k]
    rows = position[slot_order * tokens + torch.arange(tokens, device=perm.device)[:, None]]
    contributions = weighted.to(final.dtype)[rows]  # [tokens, top_k, hidden]
    for j in range(top_k):
        final += contributions[:, j]
    return final


#: Forced rows run in chunks of whole experts of at most this many rows per batch token (at
#: least one expert per chunk), so ``all`` needs about the activation memory of a top-8 routed pass.
FORCED_ROWS_PER_TOKEN = 8


def grouped_expert_calls(
    block: DefusedExperts, hidden_states: torch.Tensor, selection: Mapping[int, torch.Tensor], max_rows: int | None = None
) -> bool:
    """Run ``block[e](hidden_states[idx])`` for every ``e, idx`` of ``selection``, grouped; outputs dropped.

    Experts run in ascending order, in chunks of whole experts of at most ``max_rows`` rows
    (default ``FORCED_ROWS_PER_TOKEN`` x the batch's tokens); an expert's rows are never split,
    so its hooks see one call with all of them, as in the loop. Returns False (nothing run) when
    the block cannot run grouped; the caller then loops.
    """
    roles, reason = _plan(block, hidden_states)
    if roles is None:
        _report_fallback(block, reason)
        return False
    _record(None)
    experts = sorted(e for e, idx in selection.items() if idx.numel())
    limit = max_rows if max_rows is not None else FORCED_ROWS_PER_TOKEN * hidden_states.shape[0]
    chunk: list[int] = []
    rows = 0
    for e in [*experts, None]:
        n = 0 if e is None else int(selection[e].numel())
        if chunk and (e is None or rows + n > limit):
            counts = [0] * block.num_experts
            for c in chunk:
                counts[c] = int(selection[c].numel())
            index = torch.cat([selection[c] for c in chunk])
            expert_ids = torch.repeat_interleave(
                torch.tensor(chunk, device=index.device), torch.tensor([counts[c] for c in chunk], device=index.device)
            )
            _run_sorted(block, roles, hidden_states[index], counts, expert_ids)
            chunk, rows = [], 0
        if e is not None:
            chunk.append(e)
            rows += n
    return True


@contextmanager
def deterministic_mode(enabled: bool = True) -> Iterator[None]:
    """Deterministic CUDA kernels inside the block (``torch.use_deterministic_algorithms``), restored after.

    The per-expert loop accumulates with ``index_add_``, which on CUDA uses atomics: the sum
    order, hence the bf16 rounding, changes run to run, and so do Hessians and checkpoints. Here
    PyTorch's deterministic ``index_add_`` (sorted ``index_put_``) runs instead; ops without a
    deterministic kernel warn instead of failing (``warn_only=True``). cuBLAS also needs
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment before CUDA starts; it is set here if
    unset, which only helps when CUDA has not been used yet in the process.
    """
    if not enabled:
        yield
        return
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
