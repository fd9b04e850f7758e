"""compressed-tensors' forward wrappers in the grouped calibration forward (``calibration.grouped``).

Inside llm-compressor every Linear a quantization modifier targets gets compressed-tensors'
``quantized_forward`` as its instance ``forward`` (``set_forward_quantized``), and the pipelines
wrap every module's forward once more for offloading (``offload_module``). During calibration
both are usually plain: the sequential pipeline runs under ``DisableQuantization`` (no
fake-quantization), GPTQ/AWQ observe through forward hooks, and the offload wrapper moves inputs
that already sit on the onload device nowhere. :func:`compressed_tensors_grouping` registers the
two wrappers with the grouped forward, each with the exact test its own code applies, so a
projection runs grouped only when its wrapped forward would compute ``F.linear`` of the same rows
with the same weight:

* ``quantized_forward``: not plain when quantization is enabled on the module and its scheme
  quantizes input or output activations, or fake-quantizes the weight (status before
  ``COMPRESSED``);
* the offload wrapper: not plain when onloading is on and the input is not on the onload device.

It also registers compressed-tensors' offload caches (the ``_parameters`` the pipelines install)
as parameter stores, so a block keeps its grouped plan between calls while reading a weight hands
back the stored tensor itself: onloading disabled, a tensor kept onloaded, or one that already sits
on the onload device (``send_tensors`` then returns it unchanged). A cache that would copy (CPU or
disk offload to a GPU) makes the block plan afresh on every call, as before.

Anything else (another wrapper inside, a changed compressed-tensors) is not recognised and the
block takes the per-expert loop, with the reason logged (``calibration.grouped``).
"""

from __future__ import annotations

import itertools
import logging
import operator
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from defuser_quant.calibration.grouped import (
    MOVED,
    ForwardWrapper,
    register_forward_wrapper,
    register_parameter_store,
    unregister_forward_wrapper,
    unregister_parameter_store,
    wrapper_code,
)

__all__ = ["QUANTIZED_FORWARD", "OFFLOAD_FORWARD", "compressed_tensors_grouping", "experts_hooks_off", "hooks_mixin_parts",
           "wrapped_hook_code"]

logger = logging.getLogger(__name__)

QUANTIZED_FORWARD = "compressed_tensors.quantized_forward"
OFFLOAD_FORWARD = "compressed_tensors.offload_forward"


def wrapped_hook_code(mixin: type) -> types.CodeType | None:
    """The code object of llm-compressor's ``wrapped_hook`` (the closure ``HooksMixin.register_hook`` wraps every
    hook in); None where that wrapper is not found (another llm-compressor)."""
    return wrapper_code(mixin.register_hook, "wrapped_hook")


def hooks_mixin_parts(hook: Callable, code: types.CodeType | None) -> tuple[Callable, types.CellType] | None:
    """``(the hook it wraps, its handle cell)`` when ``hook`` is llm-compressor's ``wrapped_hook``
    (``HooksMixin.register_hook``; ``code`` its code object), else None. The handle cell is read at
    call time: the wrapper returns at once while hooks are disabled and its handle is not kept enabled."""
    if code is None or getattr(hook, "__code__", None) is not code:
        return None
    names = code.co_freevars
    if "handle" not in names or "hook" not in names:
        return None
    cells = hook.__closure__
    return cells[names.index("hook")].cell_contents, cells[names.index("handle")]


def experts_hooks_off(block: nn.Module, mixin: type, code: types.CodeType | None) -> bool:
    """Whether no hook on ``block``'s expert projections acts now: llm-compressor's wrapped hooks are all
    switched off (:func:`hooks_mixin_live` is None, as in the propagation pass) and every forward and pre-hook
    of the projections is one of them (``code``: the wrapper's code object). Hooks on the experts themselves
    already keep a block off the grouped forward."""
    if code is None or hooks_mixin_live(mixin) is not None:
        return False
    projections = [m for expert in block for m in expert._modules.values() if m is not None]
    hooks = itertools.chain(*(d.values() for m in projections for d in (m._forward_pre_hooks, m._forward_hooks)))
    return all(getattr(hook, "__code__", None) is code for hook in hooks)


def _always(_cell: types.CellType) -> bool:
    return True


def hooks_mixin_live(mixin: type) -> Callable[[types.CellType], bool] | None:
    """llm-compressor's on/off rule for its wrapped hooks (``HooksMixin``), read once per grouped
    call: None when every wrapped hook returns at once (hooks disabled and none kept enabled, as in
    the propagation pass), else a test of one hook's handle cell (from :func:`hooks_mixin_parts`)."""
    disabled, keep = mixin._HOOKS_DISABLED, mixin._HOOKS_KEEP_ENABLED
    if not disabled:
        return _always
    if not keep:
        return None
    return lambda cell: cell.cell_contents in keep


_DEVICES: dict[tuple[torch.device, object], bool] = {}


def _same_device(x: torch.device, onload: torch.device | str) -> bool:
    """Whether ``tensor.to(onload)`` leaves a tensor on ``x`` where it is (cached: it runs per module per call)."""
    key = (x, onload)
    same = _DEVICES.get(key)
    if same is not None:
        return same
    target = torch.device(onload)
    if target.type == x.type == "cuda" and target.index is None:
        return x.index == torch.cuda.current_device()  # "cuda" is the current device, which may change: not cached
    same = target.type == x.type and (target.index is None or target.index == x.index)
    _DEVICES[key] = same
    return same


class _CT:
    """compressed-tensors names, imported once (the checks run for every module on every call)."""

    COMPRESSED = None
    OffloadCache = None

    @classmethod
    def load(cls) -> None:
        from compressed_tensors.offload.cache import OffloadCache
        from compressed_tensors.quantization import QuantizationStatus

        cls.COMPRESSED, cls.OffloadCache = QuantizationStatus.COMPRESSED, OffloadCache


def _quantized_why_not_plain(m: nn.Module, x: torch.Tensor) -> str | None:
    """compressed-tensors' ``quantized_forward`` does what its own checks say, nothing else."""
    scheme = getattr(m, "quantization_scheme", None)  # the very checks quantized_forward makes
    status = getattr(m, "quantization_status", None)
    if not (getattr(m, "quantization_enabled", True) and scheme is not None and status is not None):
        return None
    if scheme.input_activations:
        return "quantizes its input activations in forward (compressed-tensors, quantization enabled)"
    if scheme.output_activations:
        return "quantizes its output activations in forward (compressed-tensors, quantization enabled)"
    if scheme.weights and status < _CT.COMPRESSED:
        return "fake-quantizes its weight in forward (compressed-tensors, quantization enabled)"
    return None


# bulk forms of the two checks below, for the check a kept plan runs on every block call
_dict_of = operator.attrgetter("__dict__")
_STATE = tuple(itertools.repeat(name) for name in ("quantization_enabled", "quantization_scheme", "quantization_status"))


def _quantized_why_not_plain_all(modules: list[nn.Module], x: torch.Tensor) -> tuple[int, str] | None:
    """:func:`_quantized_why_not_plain` over many modules, asked once per distinct state it reads
    (enabled, scheme, status as instance attributes; the first module with each is asked)."""
    dicts = list(map(_dict_of, modules))
    enabled, schemes, statuses = (list(map(dict.get, dicts, name)) for name in _STATE)
    keys = list(zip(enabled, map(id, schemes), statuses))
    for key in dict.fromkeys(keys):
        i = keys.index(key)
        problem = _quantized_why_not_plain(modules[i], x)
        if problem:
            return i, problem
    return None


def _offload_why_not_plain_all(modules: list[nn.Module], x: torch.Tensor) -> tuple[int, str] | None:
    """:func:`_offload_why_not_plain` over many modules: finds the first module it flags (no
    original forward, or an onload device other than the input's, asked once per device) and asks
    it for the reason."""
    dicts = list(map(_dict_of, modules))
    originals = list(map(dict.get, dicts, itertools.repeat("_original_forward_func")))
    flagged = [] if all(map(callable, originals)) else [next(i for i, f in enumerate(originals) if not callable(f))]
    cache = _CT.OffloadCache
    if not cache.onloading_disabled:
        params = list(map(operator.itemgetter("_parameters"), dicts))
        kinds = {k: issubclass(k, cache) for k in set(map(type, params))}  # isinstance of an ABC is Python: once per class
        cached = list(map(kinds.__getitem__, map(type, params)))
        for device in set(map(operator.attrgetter("onload_device"), itertools.compress(params, cached))):
            if not _same_device(x.device, device):
                flagged.append(next(i for i, (p, c) in enumerate(zip(params, cached)) if c and p.onload_device == device))
    for i in sorted(flagged):
        problem = _offload_why_not_plain(modules[i], x)
        if problem:
            return i, problem
    return None


def _offload_inner_all(modules: list[nn.Module], funcs: list) -> list:
    return list(map(dict.get, map(_dict_of, modules), itertools.repeat("_original_forward_func")))


def _offload_why_not_plain(m: nn.Module, x: torch.Tensor) -> str | None:
    """compressed-tensors' offload wrapper moves the inputs to the onload device, nothing else."""
    d = m.__dict__
    if not callable(d.get("_original_forward_func")):
        return "has an offload wrapper without its original forward (compressed-tensors)"
    params = d.get("_parameters")
    cache = _CT.OffloadCache
    if cache.onloading_disabled or not isinstance(params, cache):
        return None
    if not _same_device(x.device, params.onload_device):
        return f"onloads its input from {x.device} to {params.onload_device} (compressed-tensors offload)"
    return None


def _peek_offload_cache(cache: object, name: str) -> object:
    """What ``cache[name]`` returns (``OffloadCache.__getitem__``'s branches) when it returns a
    stored tensor unchanged; :data:`MOVED` when it would onload a copy."""
    offloaded = cache.offloaded_values.get(name)
    if offloaded is None or _CT.OffloadCache.onloading_disabled:
        return offloaded
    kept = _CT.OffloadCache.keep_onloaded_values.get(offloaded)
    if kept is not None:
        return kept
    if type(offloaded) is nn.Parameter or type(offloaded) is torch.Tensor:
        if not offloaded.is_meta and _same_device(offloaded.device, cache.onload_device):
            return offloaded  # send_tensors: .to(device) of a tensor already there is the same tensor
    return MOVED


_offloaded_of = operator.attrgetter("offloaded_values")
_onload_of = operator.attrgetter("onload_device")
_device_of = operator.attrgetter("device")
_PLAIN_TENSORS = frozenset({nn.Parameter, torch.Tensor})


def _peek_offload_caches(caches: list, name: str) -> list:
    """``[_peek_offload_cache(c, name) for c in caches]``, with the common cases (onloading disabled,
    plain tensors on one device, the caches' one onload device, which is where they already are) as
    C-level maps; anything else (values kept onloaded, several devices) is peeked cache by cache."""
    values = list(map(dict.get, map(_offloaded_of, caches), itertools.repeat(name)))
    cache = _CT.OffloadCache
    if cache.onloading_disabled:
        return values
    keep = cache.keep_onloaded_values
    if keep and not all(map(operator.is_, map(keep.get, values), itertools.repeat(None))):
        return [_peek_offload_cache(c, name) for c in caches]
    present = list(map(operator.is_not, values, itertools.repeat(None)))
    tensors = list(itertools.compress(values, present))
    if not tensors:
        return values
    devices = set(map(_device_of, tensors))  # a meta tensor's device is meta: is_meta needs no pass of its own
    onloads = set(map(_onload_of, itertools.compress(caches, present)))
    if len(devices) == 1 == len(onloads) and set(map(type, tensors)) <= _PLAIN_TENSORS:
        device, onload = devices.pop(), onloads.pop()
        if device.type != "meta" and _same_device(device, onload):
            return values  # send_tensors: .to(device) of a tensor already there is the same tensor
    return [_peek_offload_cache(c, name) for c in caches]


def _offload_inner(m: nn.Module, func: Callable) -> Callable | None:
    return m.__dict__["_original_forward_func"]  # checked by _offload_why_not_plain


def _wrappers() -> dict[str, ForwardWrapper]:
    from compressed_tensors.offload.module import offload_module
    from compressed_tensors.quantization.lifecycle.forward import set_forward_quantized

    _CT.load()
    quantized = wrapper_code(set_forward_quantized, "quantized_forward")
    offload = wrapper_code(offload_module, "forward")
    wrappers = {}
    if quantized is not None:
        # it calls self.__class__.forward: inner None
        wrappers[QUANTIZED_FORWARD] = ForwardWrapper(
            code=quantized, why_not_plain=_quantized_why_not_plain, inner=lambda m, f: None,
            why_not_plain_all=_quantized_why_not_plain_all, inner_all=lambda ms, fs: [None] * len(ms),
        )
    if offload is not None:
        wrappers[OFFLOAD_FORWARD] = ForwardWrapper(
            code=offload, why_not_plain=_offload_why_not_plain, inner=_offload_inner,
            why_not_plain_all=_offload_why_not_plain_all, inner_all=_offload_inner_all,
        )
    missing = {QUANTIZED_FORWARD, OFFLOAD_FORWARD} - set(wrappers)
    if missing:
        logger.warning("compressed-tensors' %s not found: those modules keep the per-expert loop", sorted(missing))
    return wrappers


@contextmanager
def compressed_tensors_grouping() -> Iterator[None]:
    """Register compressed-tensors' forward wrappers with the grouped forward inside the ``with`` block."""
    wrappers = _wrappers()
    for name, wrapper in wrappers.items():
        register_forward_wrapper(name, wrapper)
    register_parameter_store(_CT.OffloadCache, _peek_offload_cache, _peek_offload_caches)
    try:
        yield
    finally:
        unregister_parameter_store(_CT.OffloadCache)
        for name in wrappers:
            unregister_forward_wrapper(name)
