"""Grouped calibration forward: a block's experts through grouped GEMMs, per-expert hooks kept.

The per-expert loop (``DefusedExperts.routed_forward``) runs one small matmul per expert and
projection; on a GPU that bookkeeping, not the arithmetic, bounds calibration. Here a block's
tokens are sorted by expert once and each projection role (gate, up, down) runs as one
``grouped_mm`` over all experts, while every per-expert ``nn.Linear`` still has its hooks called
with exactly the rows it would have received in the loop, in the same row order:

* forward pre-hooks get ``(module, (rows,))`` and may replace the rows, as in ``Module.__call__``;
* forward hooks get ``(module, (rows,), output)`` and may replace the output;
* a registered :class:`LinearAdapter` adds the hook a non-``nn.Linear`` class calls inside its
  own forward (GPTQModel's ``HookedLinear``; ``defuser_quant.integrations.gptqmodel`` registers it),
  run batched like the hooks below when the adapter's ``inner_kind`` recognises it;
* a registered :class:`ForwardWrapper` vouches for an instance ``forward`` a library installs on
  modules (compressed-tensors' quantization and offload wrappers;
  ``defuser_quant.integrations.llmcompressor`` registers them) when, for this input, it calls
  the class forward on the same rows and nothing else;
* a registered :class:`BatchedForwardHook` runs the forward hooks (or, a ``pre`` kind, forward
  pre-hooks) it recognises (llm-compressor's GPTQ Hessian hook, DefuseModifier's token counters)
  for all the experts and roles of a grouped call at once, after their other hooks, with the same
  rows each hook would have received. A role whose every module carries exactly one hook of one
  kind and owner is queued with C-level maps; that finding is kept with the plan while the very
  same hook objects sit in the same places.

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

A block's plan is kept between calls as a template (per expert and projection: class, instance
``forward`` or not, bias or not; every weight's and bias's data pointer, shape, stride and dtype;
whether each role stacks as a zero-copy view; the input's dtype/device; the adapter/wrapper
registries' generation). Every call reads the block's current experts, projections and tensors
and checks them against it: the hook dictionaries that force the loop (kwargs, backward, hooks on
an expert) empty, classes and flags unchanged, pointers and metadata unchanged (``param.data = x``
keeps the object but re-points it). Anything else: planned afresh. The call always runs with the
current objects, so a plan holds no module or tensor (a quantizer's replaced weights are freed as
without it). Registered wrappers and adapters' ``is_plain`` are asked again on every call (their
answer depends on the input and on module state such as ``quantization_enabled``). Weights that
are not views are stacked again on every call (a kept copy would miss writes through ``.data``,
which do not bump the version counter). A block whose ``_parameters`` are not plain dicts (an
offload cache: llm-compressor's) keeps its plan only when the store's class is registered
(:func:`register_parameter_store`) and its reads return the stored tensors as they are (weights
already on the onload device); a store that copies or moves on read (CPU or disk offload to a GPU)
is planned afresh on every call, reading its tensors as the forward would.
Plain forward (pre-)hooks are read at call time, so adding or removing them needs no re-plan.

A routed block call reads the host once (the per-expert row counts, ``.tolist()``): no
``bincount`` (on CUDA it reads its maximum), no host-to-device copies of the offsets.

The routed combine adds each token's expert outputs in ascending expert order, one slot at a
time in the output dtype: the loop's ``index_add_`` order, without its atomics, so the result is
deterministic on CUDA too (``index_add_`` on CUDA is not). :func:`deterministic_mode` makes the
per-expert loop deterministic as well.
"""

from __future__ import annotations

import itertools
import logging
import operator
import re
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules import module as _module

from defuser_quant.core.defused import DefusedExpert, DefusedExperts
from defuser_quant.core.errors import DefuserQuantError

__all__ = [
    "MOVED",
    "BatchedForwardHook",
    "ForwardWrapper",
    "GroupedUse",
    "LinearAdapter",
    "RoutedIndexError",
    "call_plan",
    "check_routed_indices",
    "deterministic_mode",
    "grouped_expert_calls",
    "grouped_routed_forward",
    "grouped_routed_forward_with_counts",
    "grouped_whole_batch_calls",
    "recording_grouped_use",
    "register_batched_hook",
    "register_forward_wrapper",
    "register_linear_adapter",
    "register_parameter_store",
    "routed_output",
    "settle_batched_hooks",
    "unregister_batched_hook",
    "unregister_forward_wrapper",
    "unregister_linear_adapter",
    "unregister_parameter_store",
    "why_not_grouped",
    "wrapper_code",
]

logger = logging.getLogger(__name__)

_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class LinearAdapter:
    """How a Linear-like class behaves, for the grouped forward.

    ``is_plain(module, input)`` says whether the module's forward is ``F.linear`` plus hooks for
    this input (e.g. no input rounding, weight on the input's device; None: always);
    ``inner_hook(module, input, output)`` runs what the class's own forward runs after its
    matmul (None: nothing). ``inner_kind(module, input)``: ``(kind, owner, extra)`` when, for this
    call, the module's inner hook may run batched with the call's other hooks of ``kind`` (a
    :class:`BatchedForwardHook`: it returns None and reads only the module and its rows), else
    None; asked only for a module without forward hooks of its own.
    """

    is_plain: Callable[[nn.Module, torch.Tensor], bool] | None = None
    inner_hook: Callable[[nn.Module, torch.Tensor, torch.Tensor], None] | None = None
    inner_kind: Callable[[nn.Module, torch.Tensor], tuple[BatchedForwardHook, object, object] | None] | None = None


_ADAPTERS: dict[type, LinearAdapter] = {nn.Linear: LinearAdapter()}
#: An adapter's ``inner_hook`` -> its ``inner_kind``, for the adapters that have both (kept from ``_ADAPTERS``).
_INNER_KINDS: dict[Callable, Callable] = {}
#: Bumped whenever an adapter or wrapper is (un)registered: every cached plan is then rebuilt.
_GENERATION = 0


def _registry_changed() -> None:
    global _GENERATION
    _GENERATION += 1


#: What a parameter store's ``peek`` returns when reading the tensor would copy or move it.
MOVED = object()
_STORES: dict[type, tuple[Callable[[Mapping, str], object], Callable | None]] = {}
_PEEK_OF: dict[type, tuple[Callable[[Mapping, str], object], Callable | None] | None] = {}  # per class, by MRO


def register_parameter_store(
    cls: type, peek: Callable[[Mapping, str], object], peek_all: Callable[[list[Mapping], str], list] | None = None
) -> None:
    """Let blocks whose projections keep ``_parameters`` in a ``cls`` mapping (or a subclass) keep their plan.

    ``peek(store, name)`` must say, without side effects, what ``store[name]`` would return: the
    stored tensor itself (or None when absent) when the read hands it back unchanged, else
    :data:`MOVED` (the read would copy, onload or move it; the block is then planned afresh).
    ``peek_all(stores, name)``, optional: ``[peek(store, name) for store in stores]``, faster (a kept
    plan is checked on every block call, over every projection).
    """
    if not isinstance(cls, type) or not callable(peek) or not (peek_all is None or callable(peek_all)):
        raise TypeError(
            "register_parameter_store needs a class, a callable peek(store, name) and peek_all None or a callable "
            f"peek_all(stores, name), got {cls!r}, {peek!r}, {peek_all!r}"
        )
    _STORES[cls] = (peek, peek_all)
    _PEEK_OF.clear()
    _registry_changed()


def unregister_parameter_store(cls: type) -> None:
    """Undo :func:`register_parameter_store` (no-op when ``cls`` is not registered)."""
    if _STORES.pop(cls, None) is not None:
        _PEEK_OF.clear()
        _registry_changed()


def _peeks_of(cls: type) -> tuple[Callable[[Mapping, str], object], Callable | None] | None:
    try:
        return _PEEK_OF[cls]
    except KeyError:
        peeks = next((_STORES[c] for c in cls.__mro__ if c in _STORES), None)
        _PEEK_OF[cls] = peeks
        return peeks


def _peeked(store: Mapping) -> tuple[object, object] | None:
    """``(weight, bias)`` as a registered store's reads would hand them back; None for a store that
    is not registered or whose reads would copy or move them."""
    peeks = _peeks_of(type(store))
    if peeks is None:
        return None
    weight, bias = peeks[0](store, "weight"), peeks[0](store, "bias")
    return None if weight is MOVED or bias is MOVED else (weight, bias)


def _read_all(params: list[Mapping]) -> tuple[list, list] | None:
    """Every projection's ``(weights, biases)`` as its forward would read them, when every read hands
    back the stored tensor (plain dicts, registered stores that do not copy); else None."""
    kinds = set(map(type, params))
    if kinds == {dict}:
        return list(map(dict.get, params, _WEIGHT)), list(map(dict.get, params, _BIAS))
    peeks = _peeks_of(kinds.pop()) if len(kinds) == 1 else None
    if peeks is None or peeks[1] is None:
        stored = list(map(_peeked, params))
        return None if _any_is(stored, None) else ([w for w, _ in stored], [b for _, b in stored])
    weights, biases = peeks[1](params, "weight"), peeks[1](params, "bias")
    return None if _any_is(weights, MOVED) or _any_is(biases, MOVED) else (weights, biases)


def _read_stable(params: Mapping, weight: object, bias: object) -> bool:
    """Whether ``params`` is a plain dict or a registered store whose reads gave ``weight``/``bias`` as stored."""
    if type(params) is dict:
        return True
    stored = _peeked(params)
    return stored is not None and stored[0] is weight and stored[1] is bias


def _adapters_changed() -> None:
    _INNER_KINDS.clear()
    _INNER_KINDS.update((a.inner_hook, a.inner_kind) for a in _ADAPTERS.values() if a.inner_hook and a.inner_kind)
    _registry_changed()


def register_linear_adapter(cls: type, adapter: LinearAdapter) -> None:
    """Let modules of exactly ``cls`` take part in the grouped forward (see :class:`LinearAdapter`)."""
    _ADAPTERS[cls] = adapter
    _adapters_changed()


def unregister_linear_adapter(cls: type) -> None:
    """Undo :func:`register_linear_adapter` (``nn.Linear`` stays)."""
    if cls is not nn.Linear:
        _ADAPTERS.pop(cls, None)
        _adapters_changed()


def wrapper_code(factory: Callable, name: str) -> types.CodeType | None:
    """The code object of the function ``name`` that ``factory`` defines inside itself (None: not
    found): what every closure ``factory`` makes shares, so a wrapper or hook it made is told by
    ``function.__code__ is wrapper_code(factory, name)``."""
    code = getattr(factory, "__code__", None)
    found = [c for c in (code.co_consts if code else ()) if isinstance(c, types.CodeType) and c.co_name == name]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class ForwardWrapper:
    """An instance ``forward`` that a library installs on modules, for the grouped forward.

    ``why_not_plain(module, input)``: why, for this input, the wrapper does more than call the
    next function with the same rows and return its result unchanged (None: it does nothing more).
    ``inner(module, function)``: the next function the wrapper calls (another wrapper to check, or
    the class ``forward``), or None when it calls ``type(module).forward``. Which functions are this
    wrapper: those whose ``__code__`` is ``code`` (an exact, fast match: closures made by one factory
    share it), or for which ``matches(function)`` is true.

    Optional bulk forms, for the check a kept plan runs on every block call over many modules
    whose forwards are this wrapper: ``why_not_plain_all(modules, input)`` gives ``(index, why)``
    of the first module that is not plain (None: all are), ``inner_all(modules, functions)`` the
    list of ``inner`` results. Without them ``why_not_plain``/``inner`` are called per module.
    """

    why_not_plain: Callable[[nn.Module, torch.Tensor], str | None]
    inner: Callable[[nn.Module, Callable], Callable | None]
    code: types.CodeType | None = None
    matches: Callable[[Callable], bool] | None = None
    why_not_plain_all: Callable[[list[nn.Module], torch.Tensor], tuple[int, str] | None] | None = None
    inner_all: Callable[[list[nn.Module], list[Callable]], list[Callable | None]] | None = None

    def __post_init__(self) -> None:
        if self.code is None and self.matches is None:
            raise ValueError("ForwardWrapper needs code= or matches= to recognise its functions")


_WRAPPERS: dict[str, ForwardWrapper] = {}
_BY_CODE: dict[types.CodeType, ForwardWrapper] = {}
_MAX_WRAPPER_DEPTH = 8


def _index_wrappers() -> None:
    _registry_changed()
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


@dataclass(frozen=True)
class BatchedForwardHook:
    """A kind of forward hook the grouped forward may run for all the experts of a role at once.

    Only for hooks that return None, read nothing but their module and its input rows (not the
    output), and touch only their own module's state, so running them once the block's grouped
    call is done changes nothing. ``match(hook)``: ``(owner, extra)`` when ``hook`` is of this kind
    (hooks with one owner run in one batch; ``extra`` is the hook's own data), else None; asked once
    per hook function. ``run(owner, members)`` does what calling each member's hook as
    ``hook(module, (rows[start:start + size],), output)`` would do, for all the members
    ``(module, extra, rows, start, size)`` of the call (every role; ``rows`` is the role's whole
    input, the same tensor for roles that share it, e.g. gate and up).
    """

    match: Callable[[Callable], tuple[object, object] | None]
    run: Callable[[object, list[tuple[nn.Module, object, torch.Tensor, int, int]]], None]
    #: a kind of forward *pre*-hook instead: it returns None (never replaces the rows) and ``run``
    #: does what ``hook(module, (rows[start:start + size],))`` would for every member
    pre: bool = False
    #: called before hooks of this kind may run one module at a time (a per-expert loop): work
    #: ``run`` deferred must be done by then (see :func:`settle_batched_hooks`); None: nothing deferred
    settle: Callable[[], None] | None = None


_BATCHED: dict[str, BatchedForwardHook] = {}
# hook function -> (kind, owner, extra) or (); one cache for forward hooks, one for pre-hooks
_HOOK_KIND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PRE_HOOK_KIND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batched_changed() -> None:
    _HOOK_KIND.clear()
    _PRE_HOOK_KIND.clear()
    _registry_changed()  # kept plans remember how their hooks were batched: plan afresh


def register_batched_hook(name: str, kind: BatchedForwardHook) -> None:
    """Let the grouped forward run the forward (or, with ``kind.pre``, forward pre-) hooks ``kind``
    recognises for a role's experts at once."""
    if not isinstance(kind, BatchedForwardHook) or not callable(kind.match) or not callable(kind.run):
        raise TypeError(f"register_batched_hook({name!r}, ...) needs a BatchedForwardHook with callable match and run, got {kind!r}")
    _BATCHED[name] = kind
    _batched_changed()


def settle_batched_hooks() -> None:
    """Let every registered batched hook kind finish work its ``run`` deferred: called before a
    block's experts run one by one (the per-expert loop), where their hooks are called as they are."""
    for kind in list(_BATCHED.values()):
        if kind.settle is not None:
            kind.settle()


def unregister_batched_hook(name: str) -> None:
    """Undo :func:`register_batched_hook` (no-op when ``name`` is not registered)."""
    if _BATCHED.pop(name, None) is not None:
        _batched_changed()


def _hook_kind(hook: Callable, pre: bool = False) -> tuple:
    """``(kind, owner, extra)`` of a batchable forward hook (``pre``: forward pre-hook), else ``()``;
    cached per hook function."""
    cache = _PRE_HOOK_KIND if pre else _HOOK_KIND
    try:
        return cache[hook]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: never batched
        return ()
    found: tuple = ()
    for kind in _BATCHED.values():
        if bool(kind.pre) != pre:
            continue
        matched = kind.match(hook)
        if matched is not None:
            found = (kind, *matched)
            break
    cache[hook] = found
    return found


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


_NOT_UNIFORM = object()


class _ChainMemo:
    """What :func:`_uniform_chain_problem` derived from one group's forward objects, level by level, on
    its last call: a call that finds the very same objects (compared by identity, with C-level list
    compares) reuses their functions and wrapper instead of deriving them again. The input-dependent
    checks (``why_not_plain``) and the reads of each next level still run on every call."""

    __slots__ = ("class_forward", "levels")

    def __init__(self) -> None:
        self.class_forward: Callable | None = None
        self.levels: list[tuple[list, list | None, ForwardWrapper | None]] = []  # (objects, functions, wrapper)


def _chain_level(current: list, class_forward: Callable) -> tuple[list | None, ForwardWrapper | None] | object:
    """``(functions, wrapper)`` of one level of uniform instance forwards, ``(None, None)`` where the chain
    ends plain (no instance forward, or the class forward), :data:`_NOT_UNIFORM` where it is not uniform."""
    if _all_are(current, None):
        return None, None
    kinds = set(map(type, current))
    if kinds == {types.MethodType}:
        funcs = list(map(_func_of, current))
    elif kinds == {types.FunctionType}:
        funcs = current
    else:
        return _NOT_UNIFORM
    if _all_are(funcs, class_forward):
        return None, None
    codes = set(map(_code_of, funcs))
    wrapper = _BY_CODE.get(codes.pop()) if len(codes) == 1 else None
    return _NOT_UNIFORM if wrapper is None else (funcs, wrapper)


def _uniform_chain_problem(modules: list[nn.Module], x: torch.Tensor, memo: _ChainMemo | None = None) -> tuple[int, str] | None | object:
    """:func:`_instance_forward_problem` for modules of one class whose instance forwards are, layer
    by layer, the same code-registered wrapper: ``(index, why)`` of the first not plain, None when
    all are, :data:`_NOT_UNIFORM` when the chains differ (the caller then checks per module).
    ``memo``: what the last call on this group derived (see :class:`_ChainMemo`), updated here."""
    if len(set(map(type, modules))) != 1:
        return _NOT_UNIFORM
    class_forward = type(modules[0]).forward
    current = list(map(dict.get, map(_dict_of, modules), _FORWARD))
    known = memo.levels if memo is not None and memo.class_forward is class_forward else []
    seen = []
    for depth in range(_MAX_WRAPPER_DEPTH):
        if depth < len(known) and known[depth][0] == current:  # list ==: identity first, element by element
            level = known[depth][1:]
        else:
            known = []
            level = _chain_level(current, class_forward)
            if level is _NOT_UNIFORM:
                return _NOT_UNIFORM
        seen.append((current, *level))
        funcs, wrapper = level
        if wrapper is None:
            if memo is not None:
                memo.class_forward, memo.levels = class_forward, seen
            return None
        if wrapper.why_not_plain_all is not None:
            found = wrapper.why_not_plain_all(modules, x)
        else:
            found = next(((i, p) for i, p in enumerate(map(wrapper.why_not_plain, modules, itertools.repeat(x))) if p), None)
        if found is not None:
            return found
        current = wrapper.inner_all(modules, funcs) if wrapper.inner_all is not None else list(map(wrapper.inner, modules, funcs))
    return _NOT_UNIFORM


def _forward_problem_of_any(modules: list[nn.Module], x: torch.Tensor, memo: _ChainMemo | None = None) -> tuple[int, str] | None:
    """``(index, why)`` of the first module whose instance forward is not plain for ``x`` (None: none)."""
    found = _uniform_chain_problem(modules, x, memo) if modules else None
    if found is not _NOT_UNIFORM:
        return found
    for i, m in enumerate(modules):
        problem = _instance_forward_problem(m, x)
        if problem:
            return i, problem
    return None


@dataclass
class GroupedUse:
    """How often blocks ran grouped and why the others took the per-expert loop (see :func:`recording_grouped_use`)."""

    grouped: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    without_sync: int = 0  # ... of the grouped calls: routed ones without a host sync (``hooks=False``)

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


def _record(reason: str | None, *, synced: bool = True) -> None:
    for use in _RECORDERS:
        if reason is None:
            use.grouped += 1
            use.without_sync += not synced
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
    d = m.__dict__  # direct reads: this runs for every projection when a block is planned
    if "forward" in d:
        problem = _instance_forward_problem(m, x)
        if problem:
            return problem
    if d["_backward_hooks"] or d["_backward_pre_hooks"]:
        return "has backward hooks"
    if d["_forward_pre_hooks_with_kwargs"] or d["_forward_hooks_with_kwargs"]:
        return "has forward hooks with kwargs"
    return None


_data_ptr = torch.Tensor.data_ptr
_stride = torch.Tensor.stride
_tensor_meta = operator.attrgetter("shape", "dtype")

# A kept plan is checked on every block call over every expert and projection; these run the
# checks as C-level maps over the modules' ``__dict__``s instead of Python per module.
_dict_of = operator.attrgetter("__dict__")
_modules_of = operator.itemgetter("_modules")
_params_of = operator.itemgetter("_parameters")
_func_of = operator.attrgetter("__func__")
_code_of = operator.attrgetter("__code__")
_WEIGHT, _BIAS, _FORWARD = itertools.repeat("weight"), itertools.repeat("bias"), itertools.repeat("forward")
_EXPERT_HOOKS = tuple(map(operator.itemgetter, (
    "_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
)))
_PROJECTION_HOOKS = _EXPERT_HOOKS[2:]  # plain forward (pre-)hooks are read at call time


def _all_are(values, obj: object) -> bool:
    return all(map(operator.is_, values, itertools.repeat(obj)))


def _any_is(values, obj: object) -> bool:
    return any(map(operator.is_, values, itertools.repeat(obj)))


def _hooked(dicts: list[dict], getters: tuple) -> bool:
    return any(any(map(get, dicts)) for get in getters)


def _has(dicts: list[dict], key: str) -> list[bool]:
    return list(map(operator.contains, dicts, itertools.repeat(key)))


_pre_hooks_of = operator.attrgetter("_forward_pre_hooks")
_post_hooks_of = operator.attrgetter("_forward_hooks")
_values_of = dict.values  # insertion order; a reorder of several hooks only matters to the per-module path, which reads them live


def _hook_layout(modules: list[nn.Module], get: Callable) -> tuple[list[int], list[Callable]]:
    """Per module its number of hooks in ``get(module)``, and every hook, module by module, in call order."""
    dicts = list(map(get, modules))
    return list(map(len, dicts)), list(itertools.chain.from_iterable(map(_values_of, dicts)))


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


#: ``(kind, owner, extras)``: every module of a role has exactly one hook of one batchable kind and
#: owner; ``extras[e]`` is expert ``e``'s hook data for ``kind.run``.
_Bulk = tuple[BatchedForwardHook, object, list]


def _bulk_kind(counts: list[int], hooks: list[Callable], pre: bool) -> _Bulk | None:
    if not counts or counts.count(1) != len(counts):
        return None
    kinds = [_hook_kind(h, pre) for h in hooks]
    first = kinds[0]
    if not first or not all(k and k[0] is first[0] and k[1] is first[1] for k in kinds):
        return None
    return first[0], first[1], [k[2] for k in kinds]


class _SideHooks:
    """One kind of hook (forward or pre) of a role's modules: the bulk classification last found
    and the hook objects it was found for.

    A call whose modules carry the very same hook objects in the same places (compared by
    identity, module by module, with C-level maps) reuses it instead of asking every hook its
    kind. Only a bulk classification is kept, with its hooks (of registered batchable kinds);
    anything else is classified again on the next call and nothing of it is held. (Registering
    or dropping a kind re-plans every block, so a memo never outlives the kinds it used.)"""

    __slots__ = ("counts", "hooks", "bulk")

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.hooks: list[Callable] = []
        self.bulk: _Bulk | None = None

    def refresh(self, modules: list[nn.Module], get: Callable, pre: bool) -> _Bulk | None:
        """The bulk classification of ``modules``' hooks now (see :func:`_bulk_kind`)."""
        counts, hooks = _hook_layout(modules, get)
        if not hooks:
            return None  # hooks switched off for this call (``all``'s routed output): the memo stays for the next
        if self.bulk is not None and counts == self.counts and _same_objects(hooks, self.hooks):
            return self.bulk
        bulk = _bulk_kind(counts, hooks, pre)
        self.counts, self.hooks, self.bulk = (counts, hooks, bulk) if bulk is not None else ([], [], None)
        return bulk


class _RoleHooks:
    """A role's hook memo (forward pre-hooks and forward hooks), kept with a block's plan."""

    __slots__ = ("pre", "post")

    def __init__(self) -> None:
        self.pre, self.post = _SideHooks(), _SideHooks()

    def bulk(self, modules: list[nn.Module]) -> tuple[_Bulk | None, _Bulk | None]:
        """``(pre-hooks, forward hooks)`` of ``modules`` as one batchable kind each, or None."""
        return self.pre.refresh(modules, _pre_hooks_of, True), self.post.refresh(modules, _post_hooks_of, False)


@dataclass(eq=False)
class _Role:
    """One projection role of a block for one call: its per-expert modules and tensors, stacked.

    ``weight``/``bias`` are zero-copy views when the per-expert tensors are evenly spaced in one
    storage, else fresh stacks (a copy is never kept between calls: it would miss writes through
    ``.data``, which do not bump the version counter). ``hooks``: the role's hook memo (the kept
    plan's, else fresh).
    """

    modules: list[nn.Module]
    weight: torch.Tensor
    bias: torch.Tensor | None
    inner_hooks: tuple[Callable | None, ...] | None
    hooks: _RoleHooks = field(default_factory=_RoleHooks)


@dataclass(eq=False)
class _Live:
    """What one grouped call runs with: the roles, the gate function, whether any role has a bias."""

    roles: list[_Role]
    gate_fn: Callable
    has_bias: bool


@dataclass(eq=False)
class _Plan:
    """What a block was planned from, kept between calls: a template every call's modules are checked against.

    Each call reads the block's current experts, projections and tensors and checks them against
    the template (classes, flags, hook dictionaries, tensor pointers and metadata), so the call
    always runs with the current objects; the plan holds no module or tensor (a replaced or
    quantized expert's old weights are freed as they would be without it). Its roles' hook memos
    hold the hooks of a bulk finding (and, through them, their owners, e.g. llm-compressor's GPTQ
    modifier) until a call finds other hooks.
    """

    key: tuple
    expert_keys: tuple[str, ...]
    names: object
    role_names: tuple[str, ...]
    role_labels: tuple[str, ...]  # "gate", "up", "down" (for messages)
    expert_forward: list[bool]  # per expert: had an instance forward
    role_classes: tuple[list[type], ...]  # per role, per expert
    role_forward: tuple[list[bool], ...]  # per role, per expert: had an instance forward
    role_bias: tuple[bool, ...]  # per role: has a bias (the same for every expert)
    pointers: list[int]  # every weight, then every bias, role by role
    metadata: list[tuple]
    strides: list[tuple[int, ...]]
    # per role: (weights, biases) storage step between experts when they stack as a view, else None
    views: tuple[tuple[int | None, int | None], ...]
    # checks that depend on the input or on module state, re-run on the current modules on every call:
    # expert indices with an instance forward, per role and for the expert modules themselves (None)
    forward_rechecks: dict[int | None, list[int]]
    adapter_rechecks: tuple[tuple[int, int, LinearAdapter], ...]  # (expert, role, adapter with is_plain)
    inner_hooks: tuple[tuple[Callable | None, ...] | None, ...]  # per role
    has_bias: bool
    role_hooks: tuple[_RoleHooks, ...]  # per role: its hook memo, shared by the calls this plan serves
    # per forward_rechecks group: what its wrapper chain was derived as on the last call
    chain_memos: dict[int | None, _ChainMemo] = field(default_factory=dict)


_PLANS: weakref.WeakKeyDictionary[DefusedExperts, _Plan] = weakref.WeakKeyDictionary()
_CUDA_OK: dict[torch.device, bool] = {}
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _stack(tensors: list[torch.Tensor], step: int | None) -> torch.Tensor:
    """Stack ``tensors``: as the zero-copy view they were planned as, or a copy.

    The caller checked that every tensor still points where it was planned (evenly ``step``
    elements apart) with the planned shape, stride and dtype; first and last in one storage then
    puts the ones between in it too (live storages do not overlap)."""
    first = tensors[0]
    if step is not None and tensors[-1].untyped_storage().data_ptr() == first.untyped_storage().data_ptr():
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack(tensors)


def _live_from_plan(plan: _Plan, block: DefusedExperts) -> tuple[_Live, list] | None:
    """This call's roles (the block's current modules and tensors) if they still match the plan's
    template, else None; with the current experts (for the re-checks)."""
    modules = block.__dict__["_modules"]
    first = modules.get("0")
    if type(first) is not DefusedExpert:
        return None
    gate_fn, names = first.__dict__.get("gate_fn"), first.__dict__.get("names")
    if names is not plan.names and names != plan.names:
        return None
    experts = list(map(modules.get, plan.expert_keys))
    if not _all_are(map(type, experts), DefusedExpert):
        return None
    eds = list(map(_dict_of, experts))
    if (
        not _all_are(map(dict.get, eds, itertools.repeat("gate_fn")), gate_fn)
        or not _all_are(map(dict.get, eds, itertools.repeat("names")), names)
        or _hooked(eds, _EXPERT_HOOKS)
        or _has(eds, "forward") != plan.expert_forward
    ):
        return None
    children = list(map(_modules_of, eds))
    found = []
    for name, classes, forward, has_bias in zip(plan.role_names, plan.role_classes, plan.role_forward, plan.role_bias):
        ms = list(map(dict.get, children, itertools.repeat(name)))
        if list(map(type, ms)) != classes:
            return None
        ds = list(map(_dict_of, ms))
        if _hooked(ds, _PROJECTION_HOOKS) or _has(ds, "forward") != forward:
            return None
        read = _read_all(list(map(_params_of, ds)))
        if read is None:
            return None
        ws, bs = read
        if _any_is(ws, None) or (_any_is(bs, None) if has_bias else not _all_are(bs, None)):
            return None
        if any(_has(ds, "weight")) or any(_has(ds, "bias")):  # an attribute the forward would read instead
            if any(d.get("weight", w) is not w or d.get("bias", b) is not b for d, w, b in zip(ds, ws, bs)):
                return None
        found.append((ms, ws, bs))
    # ``param.data = other`` keeps the Parameter object but re-points it: compare what it points at
    tensors = [t for ms, ws, bs in found for t in (ws if bs[0] is None else (*ws, *bs))]
    if not (
        list(map(_data_ptr, tensors)) == plan.pointers
        and list(map(_tensor_meta, tensors)) == plan.metadata
        and list(map(_stride, tensors)) == plan.strides
    ):
        return None
    roles = [
        _Role(ms, _stack(ws, views[0]), None if bs[0] is None else _stack(bs, views[1]), inner, hooks)
        for (ms, ws, bs), views, inner, hooks in zip(found, plan.views, plan.inner_hooks, plan.role_hooks)
    ]
    return _Live(roles, gate_fn, plan.has_bias), experts


def _where(e: int, role: str | None) -> str:
    return f"expert {e} module" if role is None else f"expert {e} {role} projection"


def _rechecked(plan: _Plan, live: _Live, experts: list, sample: torch.Tensor) -> str | None:
    """Re-run, on the current modules, the input-dependent checks of a kept plan (registered
    wrappers, adapters' ``is_plain``)."""
    for r, indices in plan.forward_rechecks.items():
        pool = experts if r is None else live.roles[r].modules
        found = _forward_problem_of_any([pool[e] for e in indices], sample, plan.chain_memos.setdefault(r, _ChainMemo()))
        if found is not None:
            e = indices[found[0]]
            return f"{_where(e, None if r is None else plan.role_labels[r])} {found[1]}"
    for e, r, adapter in plan.adapter_rechecks:
        m = live.roles[r].modules[e]
        if not adapter.is_plain(m, sample):
            return f"{_where(e, plan.role_labels[r])} {type(m).__name__} forward is not plain for this input"
    return None


def _get_plan(block: DefusedExperts, hidden_states: torch.Tensor) -> tuple[_Live | None, str | None]:
    """What the block runs grouped with this call (from its kept plan while nothing it was built
    from changed, else planned afresh), or why it cannot run grouped."""
    if type(block).routed_forward is not DefusedExperts.routed_forward or type(block).new_output is not DefusedExperts.new_output:
        return None, f"{type(block).__name__} has its own routed forward (irregular family)"
    if hidden_states.dim() != 2:
        return None, f"hidden_states is {hidden_states.dim()}-D, expected [tokens, hidden]"
    if not hasattr(torch.nn.functional, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
        return None, "this torch has no grouped_mm"
    device = hidden_states.device
    if hidden_states.dtype not in _GROUPED_DTYPES:
        return None, f"grouped_mm has no {hidden_states.dtype} kernel"
    if hidden_states.is_cuda:
        capable = _CUDA_OK.get(device)
        if capable is None:
            capable = _CUDA_OK[device] = torch.cuda.get_device_capability(device) >= (8, 0)
        if hidden_states.dtype != torch.bfloat16 or not capable:
            return None, "grouped_mm on CUDA needs bf16 on compute capability 8.0 or newer"
    if torch.is_autocast_enabled(device.type):
        return None, "autocast is on"
    if torch.compiler.is_compiling():
        return None, "inside torch.compile"
    if _global_hooks():
        return None, "global module hooks are registered"
    sample = hidden_states[:0]
    key = (type(block), hidden_states.dtype, device, _GENERATION, block.num_experts)
    plan = _PLANS.get(block)
    if plan is not None and plan.key == key:
        current = _live_from_plan(plan, block)
        if current is not None:
            live, experts = current
            reason = _rechecked(plan, live, experts, sample)
            return (None, reason) if reason else (live, None)
    if plan is not None:
        _PLANS.pop(block, None)
    live, plan, reason = _build_plan(block, sample, key)
    if plan is not None:
        _PLANS[block] = plan
    return live, reason


def _step(view: torch.Tensor | None) -> int | None:
    return None if view is None else view.stride(0)


def _build_plan(block: DefusedExperts, sample: torch.Tensor, key: tuple) -> tuple[_Live | None, _Plan | None, str | None]:
    """Check every expert and projection of the block: ``(this call's roles, the plan to keep or
    None, why not grouped)``. A plan is kept only when every ``_parameters`` is a plain dict or a
    registered store whose reads return the stored tensors (an offload cache that onloads copies
    has its block planned afresh on every call).

    Weight and bias are read once per projection (an offload cache onloads them on each read, as
    the module's forward would)."""
    names = block[0].names
    gate_fn = block[0].gate_fn
    on_cuda = sample.is_cuda
    device_index = sample.get_device()
    dtype = sample.dtype
    device = sample.device
    other_device = device.type not in ("cpu", "cuda")
    roles = [r for r in _ROLES if getattr(names, r) is not None]
    role_names = tuple(getattr(names, r) for r in roles)
    found: dict[str, tuple[list, list, list, list]] = {r: ([], [], [], []) for r in roles}
    expert_forward, keep, any_inner = [], True, False
    forward_rechecks: dict[int | None, list[int]] = {}
    adapter_rechecks = []
    classes: dict[str, list[type]] = {r: [] for r in roles}
    wrapped_flags: dict[str, list[bool]] = {r: [] for r in roles}
    for e, expert in enumerate(block):
        if type(expert) is not DefusedExpert or expert.gate_fn is not gate_fn or expert.names != names:
            return None, None, f"expert {e} is a {type(expert).__name__} with its own forward or names"
        if expert._forward_pre_hooks or expert._forward_hooks:
            return None, None, f"expert {e} module itself is hooked"
        problem = _module_hook_problem(expert, sample)
        if problem:
            return None, None, f"expert {e} module {problem}"
        ed = expert.__dict__
        if "forward" in ed:
            forward_rechecks.setdefault(None, []).append(e)
        children = ed["_modules"]
        for ri, (r, name) in enumerate(zip(roles, role_names)):
            m = children.get(name)
            if m is None:
                return None, None, f"expert {e} {r} projection is missing"
            cls = type(m)
            adapter = _ADAPTERS.get(cls)
            if adapter is None:
                return None, None, f"expert {e} {r} projection is a {cls.__name__}, not a plain nn.Linear"
            d = m.__dict__  # direct reads: this runs for every projection whenever a block is planned
            wrapped = "forward" in d
            if wrapped:
                problem = _instance_forward_problem(m, sample)
                if problem:
                    return None, None, f"expert {e} {r} projection {problem}"
            if d["_backward_hooks"] or d["_backward_pre_hooks"]:
                return None, None, f"expert {e} {r} projection has backward hooks"
            if d["_forward_pre_hooks_with_kwargs"] or d["_forward_hooks_with_kwargs"]:
                return None, None, f"expert {e} {r} projection has forward hooks with kwargs"
            params = d["_parameters"]
            weight = params.get("weight")
            if (
                weight is None
                or weight.dtype is not dtype
                or weight.is_meta
                or weight.is_cuda is not on_cuda
                or weight.get_device() != device_index
                or (other_device and weight.device != device)
                or weight.dim() != 2
            ):
                seen = "no weight" if weight is None else f"weight {weight.dtype} on {weight.device}"
                return None, None, f"expert {e} {r} projection {seen} does not match the input ({dtype} on {device})"
            bias = params.get("bias")
            if d.get("weight", weight) is not weight or d.get("bias", bias) is not bias:
                return None, None, (
                    f"expert {e} {r} projection has a weight or bias attribute that is not its parameter "
                    "(its forward would use the attribute)"
                )
            if adapter.is_plain is not None:
                if not adapter.is_plain(m, sample):
                    return None, None, f"expert {e} {r} projection {cls.__name__} forward is not plain for this input"
                adapter_rechecks.append((e, ri, adapter))
            if wrapped:
                forward_rechecks.setdefault(ri, []).append(e)
            keep = keep and _read_stable(params, weight, bias)
            classes[r].append(cls)
            wrapped_flags[r].append(wrapped)
            modules, weights, biases, inner = found[r]
            modules.append(m)
            weights.append(weight)
            biases.append(bias)
            inner.append(adapter.inner_hook)
            any_inner = any_inner or adapter.inner_hook is not None
        expert_forward.append("forward" in ed)
    planned, views, inner_hooks = [], [], []
    for r in roles:
        modules, weights, biases, inner = found[r]
        shape, has_bias = weights[0].shape, biases[0] is not None
        for e, (w, b) in enumerate(zip(weights, biases, strict=True)):
            if w.shape != shape or (b is not None) != has_bias or (b is not None and b.shape != (shape[0],)):
                return None, None, f"expert {e} {r} projection shape {tuple(w.shape)} (bias {b is not None}) differs from expert 0's"
        weight_view = _stacked_view(weights)
        bias_view = _stacked_view(biases) if has_bias else None
        hooks = tuple(inner) if any_inner else None
        planned.append(
            _Role(
                modules=modules,
                weight=weight_view if weight_view is not None else torch.stack(weights),
                bias=None if not has_bias else bias_view if bias_view is not None else torch.stack(biases),
                inner_hooks=hooks,
            )
        )
        views.append((_step(weight_view), _step(bias_view)))
        inner_hooks.append(hooks)
    has_bias = any(role.bias is not None for role in planned)
    live = _Live(planned, gate_fn, has_bias)
    if not keep:
        return live, None, None
    tensors = [t for r in roles for t in (found[r][1] if found[r][2][0] is None else (*found[r][1], *found[r][2]))]
    plan = _Plan(
        key=key,
        expert_keys=tuple(map(str, range(len(block)))),
        names=names,
        role_names=role_names,
        role_labels=tuple(roles),
        expert_forward=expert_forward,
        role_classes=tuple(classes[r] for r in roles),
        role_forward=tuple(wrapped_flags[r] for r in roles),
        role_bias=tuple(role.bias is not None for role in planned),
        pointers=list(map(_data_ptr, tensors)),
        metadata=list(map(_tensor_meta, tensors)),
        strides=list(map(_stride, tensors)),
        views=tuple(views),
        forward_rechecks=forward_rechecks,
        adapter_rechecks=tuple(adapter_rechecks),
        inner_hooks=tuple(inner_hooks),
        has_bias=has_bias,
        role_hooks=tuple(role.hooks for role in planned),
    )
    return live, plan, None


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
    return _get_plan(block, hidden_states)[1]


def _stacked_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """``torch.stack(tensors)`` as a zero-copy view when they are evenly spaced in one storage, else None."""
    first = tensors[0]
    if len(tensors) == 1:
        return first.unsqueeze(0)
    storage = first.untyped_storage().data_ptr()
    step = tensors[1].storage_offset() - first.storage_offset()
    if step > 0 and all(
        t.untyped_storage().data_ptr() == storage
        and t.stride() == first.stride()
        and t.storage_offset() == first.storage_offset() + i * step
        for i, t in enumerate(tensors)
    ):
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), first.storage_offset())
    return None


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


def _call_post_hooks(
    m: nn.Module, inner_hook: Callable | None, rows: torch.Tensor, out: torch.Tensor, queue: Callable | None = None
) -> torch.Tensor:
    """Run ``m``'s forward hooks on its rows; with ``queue``, the batchable ones are handed to
    ``queue(kind, owner, extra)`` instead of called (an adapter's inner hook too, when its
    ``inner_kind`` says so and ``m`` has no forward hooks to run after it)."""
    if inner_hook is not None:
        found = None
        if queue is not None and not m._forward_hooks:
            kind_of = _INNER_KINDS.get(inner_hook)
            found = kind_of(m, rows) if kind_of is not None else None
        if found:
            queue(*found)
        else:
            inner_hook(m, rows, out)
    for hook in tuple(m._forward_hooks.values()):
        if queue is not None:
            kind = _hook_kind(hook)
            if kind:
                queue(*kind)
                continue
        result = hook(m, (rows,), out)
        if result is not None:
            out = result
    return out


class _Batches:
    """Batchable hook calls queued over the roles of one grouped call, run together at its end.

    Members: ``(module, extra, rows, start, size)`` with ``rows`` the role's whole input (the
    gate and up roles share it, so a batched hook can compute what they have in common once)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.starts = list(itertools.accumulate(sizes, initial=0))  # every role's rows split the same way
        self.by_owner: dict[tuple[BatchedForwardHook, int], tuple[object, list]] = {}

    def _span(self, rows: torch.Tensor, i: int, shared: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
        """``(rows, start, size)`` of the ``i``-th expert in the role input ``rows`` (all of ``shared`` when given)."""
        return (shared, 0, shared.shape[0]) if shared is not None else (rows, self.starts[i], self.sizes[i])

    def _queue(self, kind: BatchedForwardHook, owner: object, extra: object, m: nn.Module, span: tuple) -> None:
        self.by_owner.setdefault((kind, id(owner)), (owner, []))[1].append((m, extra, *span))

    def queue_for(self, m: nn.Module, rows: torch.Tensor, i: int, shared: torch.Tensor | None = None) -> Callable:
        """The queue for the hooks of ``m``, the ``i``-th expert with rows of the role input ``rows``
        (``shared``: every expert of the role has all of this one tensor as its rows instead)."""
        span = self._span(rows, i, shared)

        def queue(kind: BatchedForwardHook, owner: object, extra: object) -> None:
            self._queue(kind, owner, extra, m, span)

        return queue

    def take(self, modules: list[nn.Module], hit: list[int], post: list[int], rows: torch.Tensor,
             shared: torch.Tensor | None) -> list[int]:
        """Queue the hooks of the ``post`` experts that have one forward hook, of a batchable kind
        (what :func:`_call_post_hooks` would do for them, without a call per module); the rest of
        ``post`` is returned for the per-module path."""
        rest = []
        for i in post:
            m = modules[hit[i]]
            hooks = m._forward_hooks
            kind = _hook_kind(next(iter(hooks.values()))) if len(hooks) == 1 else ()
            if kind:
                self._queue(*kind, m, self._span(rows, i, shared))
            else:
                rest.append(i)
        return rest

    def extend(self, bulk: _Bulk, modules: list[nn.Module], hit: list[int], rows: torch.Tensor,
               shared: torch.Tensor | None) -> None:
        """Queue the one batchable hook of every ``hit`` expert's module (``bulk``: what
        :class:`_RoleHooks` found for the role), built with C-level maps, not a step per module."""
        kind, owner, extras = bulk
        ms = map(modules.__getitem__, hit)
        data = map(extras.__getitem__, hit)
        if shared is not None:
            n = shared.shape[0]
            members = zip(ms, data, itertools.repeat(shared), itertools.repeat(0), itertools.repeat(n))
        else:
            members = zip(ms, data, itertools.repeat(rows), self.starts, self.sizes)
        self.by_owner.setdefault((kind, id(owner)), (owner, []))[1].extend(members)

    def run(self) -> None:
        for (kind, _), (owner, members) in self.by_owner.items():
            kind.run(owner, members)
        self.by_owner.clear()


def _project(
    role: _Role, x: torch.Tensor, hit: list[int], sizes: list[int], offs: torch.Tensor, expert_ids: torch.Tensor | None,
    span: slice, batches: _Batches | None = None, shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """One projection role over the experts of ``span``: hooks per expert (only where there are any), one grouped GEMM.

    ``hit`` are the experts with rows (ascending), ``sizes`` their row counts, ``offs`` the int32
    end offsets of every expert of ``span``, ``expert_ids`` each row's expert (for the bias);
    batchable hooks go to ``batches`` (the caller runs them). ``shared``: every expert's rows are
    this one tensor (``x`` holds a copy per expert); its hooks are handed ``shared`` itself.
    """
    modules = role.modules
    inner = role.inner_hooks
    pre_bulk = post_bulk = None
    if batches is not None:
        pre_bulk, post_bulk = role.hooks.bulk(modules)
        if inner is not None:
            post_bulk = None  # an adapter's inner hook runs per module, before the forward hooks
    pieces = None
    if pre_bulk is not None:
        batches.extend(pre_bulk, modules, hit, x, shared)  # batchable pre-hooks never replace the rows
        pre = []
    else:
        pre = [i for i, e in enumerate(hit) if modules[e]._forward_pre_hooks]
    if pre:
        pieces = [shared] * len(hit) if shared is not None else list(x.split(sizes))
        replaced = False
        for i in pre:
            rows = pieces[i]
            new = _call_pre_hooks(modules[hit[i]], rows)
            if new is not rows:
                pieces[i], replaced = new, True
        if replaced:
            x, shared = torch.cat(pieces), None
    weight, bias = role.weight, role.bias
    out = _grouped_mm(x, weight[span].transpose(-2, -1), offs)
    if bias is not None:
        out = out + bias[expert_ids]
    if post_bulk is not None:
        batches.extend(post_bulk, modules, hit, x, shared)
        return out
    post = [i for i, e in enumerate(hit) if modules[e]._forward_hooks or (inner is not None and inner[e] is not None)]
    if post and batches is not None and inner is None:
        post = batches.take(modules, hit, post, x, shared)
    if not post:
        return out
    if pieces is None:
        pieces = [shared] * len(hit) if shared is not None else x.split(sizes)
    outs = list(out.split(sizes))
    changed = False
    for i in post:
        e = hit[i]
        queue = None if batches is None else batches.queue_for(modules[e], x, i, shared)
        new = _call_post_hooks(modules[e], None if inner is None else inner[e], pieces[i], outs[i], queue)
        if new is not outs[i]:
            outs[i], changed = new, True
    return torch.cat(outs) if changed else out


def _run_sorted(
    plan: _Live, x: torch.Tensor, counts: list[int], offs: torch.Tensor, expert_ids: torch.Tensor | None, first: int = 0,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert outputs for rows ``x`` sorted by expert, grouped: ``counts`` rows for each expert from
    ``first`` on, ``offs`` their int32 cumulative sum on the rows' device; ``shared``: every
    expert's rows are copies of this tensor (see :func:`_project`)."""
    hit = [first + i for i, n in enumerate(counts) if n]
    sizes = [counts[e - first] for e in hit]
    span = slice(first, first + len(counts))
    roles = plan.roles
    batches = _Batches(sizes) if _BATCHED or _INNER_KINDS else None
    gate = _project(roles[0], x, hit, sizes, offs, expert_ids, span, batches, shared) if len(roles) == 3 else None
    up = _project(roles[-2], x, hit, sizes, offs, expert_ids, span, batches, shared)
    out = _project(roles[-1], plan.gate_fn(gate, up), hit, sizes, offs, expert_ids, span, batches)
    if batches is not None:
        batches.run()
    return out


def grouped_routed_forward(
    block: DefusedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    *, hooks: bool = True,
) -> torch.Tensor | None:
    """``block.routed_forward`` through grouped GEMMs; None when the block cannot (see :func:`why_not_grouped`).

    Each expert's projections see the rows of the loop in the loop's order (top-k slot, then
    token); the combine adds in ascending expert order like the loop's ``index_add_``. ``hooks``:
    as :func:`grouped_routed_forward_with_counts`'.
    """
    result = grouped_routed_forward_with_counts(block, hidden_states, top_k_index, top_k_weights, hooks=hooks)
    return None if result is None else result[0]


def call_plan(block: DefusedExperts, hidden_states: torch.Tensor) -> _Live | None:
    """What the block runs grouped with for this input, or None (the reason reported) when it cannot.

    Several grouped calls of one block in a row (``routing: all``'s routed forward, then its
    whole-batch calls) can share it through their ``plan`` argument instead of checking the block
    again each; it stays valid only while nothing about the block's experts changes in between
    (hook dictionaries of the projections excepted: those are read on every call)."""
    plan, reason = _get_plan(block, hidden_states)
    if plan is None:
        _report_fallback(block, reason)
    return plan


def routed_output(
    block: DefusedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    grouped: bool = True, *, hooks: bool = True,
) -> torch.Tensor:
    """The block's routed output: :func:`grouped_routed_forward` when ``grouped`` and the block can, else
    ``block.routed_forward`` (the per-expert loop). ``hooks``: as :func:`grouped_routed_forward_with_counts`'."""
    output = grouped_routed_forward(block, hidden_states, top_k_index, top_k_weights, hooks=hooks) if grouped else None
    if output is None:
        settle_batched_hooks()
        return block.routed_forward(hidden_states, top_k_index, top_k_weights)
    return output


class RoutedIndexError(DefuserQuantError, IndexError):
    """A routed call without a host sync saw an expert index outside ``[0, num_experts)``."""


#: Per block: a device flag set when a routed call without a host sync (``hooks=False``) saw an expert
#: index outside ``[0, num_experts)``; read by :func:`check_routed_indices`.
_INDEX_FLAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _synced_counts(bounds: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> list[int] | None:
    """The rows per expert from the sorted ``expert_ids``' ``bounds``, read at one host sync with the range
    check (sorted: first and last are min and max); None (recorded) when an index leaves ``[0, num_experts)``."""
    *edges, low, high = torch.cat([bounds, expert_ids[:1], expert_ids[-1:]]).tolist()
    if low < 0 or high >= num_experts:
        logger.debug("grouped forward off: expert indices outside [0, %d)", num_experts)
        _record(f"expert indices outside [0, {num_experts})")
        return None
    _record(None)
    return [b - a for a, b in itertools.pairwise(edges)]


def _flag_outside(block: DefusedExperts, expert_ids: torch.Tensor) -> None:
    """Set ``block``'s flag when the sorted ``expert_ids`` leave ``[0, num_experts)`` (on the device: no sync)."""
    outside = (expert_ids[:1] < 0) | (expert_ids[-1:] >= block.num_experts)
    flag = _INDEX_FLAGS.get(block)
    if flag is None or flag.device != outside.device:
        _INDEX_FLAGS[block] = outside
    else:
        flag.logical_or_(outside)


def check_routed_indices() -> None:
    """Raise :class:`RoutedIndexError` when a routed call without a host sync (``hooks=False``) saw an expert
    index outside ``[0, num_experts)`` since the last check: that call's output is wrong (the per-expert loop
    refuses such an index at once). Reads each flag once (one sync per block); clears them."""
    flags = list(_INDEX_FLAGS.items())
    _INDEX_FLAGS.clear()
    for block, flag in flags:
        if bool(flag.any()):
            raise RoutedIndexError(
                f"a pass without expert hooks routed tokens of a {type(block).__name__} block to an expert index "
                f"outside [0, {block.num_experts}), so its output was wrong; run without the sync-free routed forward "
                "(llm-compressor: DefuseModifier(sync_free_propagation=False, sync_free_calibration=False)) to have the "
                "call refuse it, and check the model's router"
            )


def _no_weightless_experts(block: DefusedExperts) -> bool:
    """Whether every routed index of ``block`` must be one of its experts: its class keeps the per-expert loop
    that refuses any other (families with weightless experts override it and take indices past them)."""
    return type(block).routed_forward is DefusedExperts.routed_forward


def _run_hookless(plan: _Live, x: torch.Tensor, offs: torch.Tensor, expert_ids: torch.Tensor | None) -> torch.Tensor:
    """:func:`_run_sorted` for a call on which no hook of the experts acts: the same grouped GEMMs over every
    expert of the block (``offs``: one end offset per expert), without the rows per expert on the host."""
    roles = plan.roles
    span = slice(0, offs.numel())  # _run_sorted's span for counts of every expert from the first

    def project(role: _Role, rows: torch.Tensor) -> torch.Tensor:
        out = _grouped_mm(rows, role.weight[span].transpose(-2, -1), offs)
        return out if role.bias is None else out + role.bias[expert_ids]

    gate = project(roles[0], x) if len(roles) == 3 else None
    up = project(roles[-2], x)
    return project(roles[-1], plan.gate_fn(gate, up))


def grouped_routed_forward_with_counts(
    block: DefusedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    plan: _Live | None = None, *, hooks: bool = True, sync_counts: bool = False, device_counts: bool = False,
) -> tuple[torch.Tensor, list[int] | torch.Tensor | None] | None:
    """:func:`grouped_routed_forward` plus the routed rows per expert (host ints, read by its one host
    sync); ``plan``: from :func:`call_plan` for this block and call (else checked here).

    ``hooks=False``: the caller vouches that no hook of the block's experts acts on this call (every one
    switched off or suspended). On a block without weightless experts whose Linears run nothing of their own
    after the matmul (no adapter inner hook) the grouped GEMMs then run from the device's offsets alone. By
    default the call then has no host sync: the rows per expert stay on the device (the counts are None) and
    an expert index outside ``[0, num_experts)``, which the per-expert loop refuses at once, sets a flag that
    :func:`check_routed_indices` raises on later. ``sync_counts=True`` reads the counts (and checks the
    indices, returning None for the loop to refuse them) at one host sync after the GEMMs are queued;
    ``device_counts=True`` instead returns them without a sync, as an int64 tensor on the device (an index
    outside the block sets the flag, as above, and counts for no expert). With either, where the GEMMs cannot
    run from the offsets alone it returns None at once (nothing run, nothing recorded): the caller then runs
    the call with its hooks suspended."""
    if plan is None:
        plan = call_plan(block, hidden_states)
        if plan is None:
            return None
    hookless = not hooks and _no_weightless_experts(block) and all(role.inner_hooks is None for role in plan.roles)
    if (sync_counts or device_counts) and not hookless:
        return None
    tokens, top_k = top_k_index.shape
    if tokens == 0 or top_k == 0:
        _record("no routed tokens in this batch")
        return None
    num_experts = block.num_experts
    # Flat index k * tokens + t: a stable sort by expert keeps the loop's (slot, token) order.
    flat_ids = top_k_index.T.reshape(-1)
    expert_ids, perm = torch.sort(flat_ids, stable=True)
    # Expert e's rows are [bounds[e], bounds[e + 1]) of the sorted order (no bincount: on CUDA it syncs).
    bounds = torch.searchsorted(expert_ids, torch.arange(num_experts + 1, device=expert_ids.device, dtype=expert_ids.dtype))
    offs = bounds[1:].to(torch.int32)
    token_idx = perm % tokens
    counts: list[int] | torch.Tensor | None = None
    if hookless:
        out = _run_hookless(plan, hidden_states[token_idx], offs, expert_ids if plan.has_bias else None)
        if sync_counts:
            counts = _synced_counts(bounds, expert_ids, num_experts)
            if counts is None:
                return None
        else:
            _flag_outside(block, expert_ids)
            _record(None, synced=False)
            if device_counts:
                counts = bounds[1:] - bounds[:-1]
    else:
        counts = _synced_counts(bounds, expert_ids, num_experts)
        if counts is None:
            return None
        out = _run_sorted(plan, hidden_states[token_idx], counts, offs, expert_ids if plan.has_bias else None)
    slot_idx = perm // tokens
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
    return final, counts


#: Forced rows run in chunks of whole experts (at least one expert per chunk) of at most this many
#: rows per batch token, so ``all`` needs about the activation memory of a top-8 routed pass ...
FORCED_ROWS_PER_TOKEN = 8
#: ... or, when more, as many rows as fit this many bytes of gathered input: a short batch then
#: runs its forced rows in one or a few chunks instead of one per handful of experts.
FORCED_CHUNK_BYTES = 256 * 2**20


def forced_chunk_rows(hidden_states: torch.Tensor) -> int:
    """Rows per forced chunk for this batch (see ``FORCED_ROWS_PER_TOKEN`` and ``FORCED_CHUNK_BYTES``)."""
    row_bytes = max(1, hidden_states.shape[-1] * hidden_states.element_size())
    return max(FORCED_ROWS_PER_TOKEN * hidden_states.shape[0], FORCED_CHUNK_BYTES // row_bytes)


def _on(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device``, without a host sync (pageable copies are staged at once)."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def grouped_expert_calls(
    block: DefusedExperts, hidden_states: torch.Tensor, selection: Mapping[int, torch.Tensor], max_rows: int | None = None
) -> bool:
    """Run ``block[e](hidden_states[idx])`` for every ``e, idx`` of ``selection``, grouped; outputs dropped.

    Experts run in ascending order, in chunks of whole experts of at most ``max_rows`` rows
    (default :func:`forced_chunk_rows`); an expert's rows are never split,
    so its hooks see one call with all of them, as in the loop. Returns False (nothing run) when
    the block cannot run grouped; the caller then loops.
    """
    plan, reason = _get_plan(block, hidden_states)
    if plan is None:
        _report_fallback(block, reason)
        return False
    _record(None)
    sizes = {e: idx.numel() for e, idx in selection.items()}
    experts = sorted(e for e, n in sizes.items() if n)
    limit = max_rows if max_rows is not None else forced_chunk_rows(hidden_states)
    device = hidden_states.device
    chunk: list[int] = []
    rows = 0
    for e in [*experts, None]:
        n = 0 if e is None else sizes[e]
        if chunk and (e is None or rows + n > limit):
            first = chunk[0]  # the chunk's GEMM spans experts chunk[0]..chunk[-1] only
            counts = [0] * (chunk[-1] + 1 - first)
            for c in chunk:
                counts[c - first] = sizes[c]
            index = torch.cat([selection[c] for c in chunk])
            offs = _on(list(itertools.accumulate(counts)), torch.int32, device)
            expert_ids = None
            if plan.has_bias:
                expert_ids = torch.repeat_interleave(
                    _on(chunk, torch.long, device), _on([sizes[c] for c in chunk], torch.long, device), output_size=rows
                )
            _run_sorted(plan, hidden_states[index], counts, offs, expert_ids, first)
            chunk, rows = [], 0
        if e is not None:
            chunk.append(e)
            rows += n
    return True


def grouped_whole_batch_calls(
    block: DefusedExperts, hidden_states: torch.Tensor, max_rows: int | None = None, plan: _Live | None = None
) -> bool:
    """Run ``block[e](hidden_states)`` for every expert ``e``, grouped; outputs dropped.

    Each expert's projections see every row of ``hidden_states`` in order, in one call: the gate
    and up hooks are handed ``hidden_states`` itself (so a batched hook computes what those rows
    give once for all experts), the down hooks that expert's own rows. Experts run in ascending
    order, in chunks of whole experts of at most ``max_rows`` rows (default
    :func:`forced_chunk_rows`; at least one expert). Returns False (nothing run) when the block
    cannot run grouped; the caller then loops. ``plan``: from :func:`call_plan` (else checked here).
    """
    if plan is None:
        plan = call_plan(block, hidden_states)
        if plan is None:
            return False
    _record(None)
    tokens, num_experts = hidden_states.shape[0], block.num_experts
    if tokens == 0:
        return True
    limit = max_rows if max_rows is not None else forced_chunk_rows(hidden_states)
    per_chunk = max(1, limit // tokens)
    device = hidden_states.device
    for first in range(0, num_experts, per_chunk):
        n = min(per_chunk, num_experts - first)
        offs = _on([tokens * (i + 1) for i in range(n)], torch.int32, device)
        expert_ids = None
        if plan.has_bias:
            expert_ids = torch.arange(first, first + n, device=device).repeat_interleave(tokens)
        rows = hidden_states.repeat(n, 1)
        _run_sorted(plan, rows, [tokens] * n, offs, expert_ids, first, shared=hidden_states)
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
