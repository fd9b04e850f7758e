"""GPTQModel's GPTQ Hessian hook, run for all the experts of a grouped call at once.

During ``quantize()`` every expert projection is a ``HookedLinear`` whose ``forward_hook`` is
GPTQModel's hook chain: the looper's masked wrapper (``_masked_pre_hook_wrapper`` for MoE modules,
``_masked_hook_wrapper`` else: paused check, keep mask, region timer) around the GPTQ processor's
``tmp`` hook, which calls ``GPTQ.add_batch``: the rows converted to float32, ``X.T @ X`` added to
the module's per-device Hessian partial under the task's lock, a CUDA event recorded, the sample
counts bumped. On an H200 that took 1.8 s of the calibration forward of two Qwen3-30B-A3B layers
(146 us per hook call, round 20's sampled profile); with ``HessianConfig.dedup_shared_inputs`` (the default) an expert's up
projection gets ``skip``, a no-op: its gate's Hessian is copied to it later.

With :func:`gptq_hessian_batching` the grouped forward hands these hooks over at the end of each
grouped call (``LinearAdapter.inner_kind``): per call each role's input is converted once, each
expert's product is ``matmul(X.T, X)`` on a view of it (the hook's operands, strides and
summation order), the products go into the partials as the hook puts them (the first one kept,
later ones added, in one multi-tensor add per :data:`~defuser_quant.calibration.gram.PRODUCT_BUDGET`),
with each task's lock held, one event recorded for them, and every counter moved as ``add_batch``
moves it. The region timer gets one record per hook, the call's time shared out; with
``record_gptq_kernels(stages=True)`` the batch is timed as the ``hessian`` stage.

Only the chain this was checked against is batched: the source of every GPTQModel function it
stands in for must be 7.6.0's (one digest, :data:`HOOK_CHAIN_DIGEST`), else nothing is batched and
a warning says why. Per module and call, the hook runs itself when anything differs: another hook
function, NVFP4 activation capture, a task that is not a plain ``GPTQ`` (GPTAQ, FOEM, a subclass) on a
``nn.Linear``, chunked or padded Hessian accumulation, a module with forward hooks, or a subset's
last module (``forward_hook_last``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from defuser_quant.calibration.gram import PRODUCT_BUDGET, QueuedAdds, gram_operands
from defuser_quant.calibration.grouped import BatchedForwardHook, wrapper_code

from .compat import source_digest
from .kernels import stage

__all__ = ["HOOK_CHAIN_DIGEST", "HessianBatching", "chain_mismatch", "gptq_hessian_batching", "last_batching"]

logger = logging.getLogger(__name__)

#: sha256[:16] over the digests of GPTQModel 7.6.0's functions the batched hook stands in for
HOOK_CHAIN_DIGEST = "1420f76270328453"


@dataclass
class HessianBatching:
    """What one :func:`gptq_hessian_batching` block did: Hessian accumulations done batched, the
    products they took, shared-input followers' no-op hooks batched, and hooks left to run
    themselves (see the module docstring for why one is)."""

    batched: int = 0
    products: int = 0
    followers: int = 0
    by_hook: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(batched=self.batched, products=self.products, followers=self.followers, by_hook=self.by_hook)


_LAST = HessianBatching()
_STATS_LOCK = threading.Lock()


def last_batching() -> HessianBatching:
    """The counts of the latest (or current) :func:`gptq_hessian_batching` block."""
    return _LAST


class _Chain:
    """GPTQModel's names, resolved when batching is switched on."""

    GPTQ: Any = None
    wrappers: dict[types.CodeType, str] = {}  # wrapper code -> the timer region it records
    tmp: types.CodeType | None = None
    skip: types.CodeType | None = None
    methods: tuple = ()  # GPTQ's unwrapped add_batch, process_batch, compute_hessian_xtx


_METHODS = ("add_batch", "process_batch", "compute_hessian_xtx")


def _chain_functions() -> dict[str, Callable]:
    from gptqmodel.looper.gptq_processor import GPTQProcessor
    from gptqmodel.looper.module_looper import ModuleLooper
    from gptqmodel.quantization.gptq import GPTQ

    return {
        "ModuleLooper._masked_pre_hook_wrapper": ModuleLooper._masked_pre_hook_wrapper,
        "ModuleLooper._masked_hook_wrapper": ModuleLooper._masked_hook_wrapper,
        "ModuleLooper._get_processor_hooks_paused": ModuleLooper._get_processor_hooks_paused,
        "GPTQProcessor.pre_process_fwd_hook": GPTQProcessor.pre_process_fwd_hook,
        **{f"GPTQ.{name}": getattr(GPTQ, name) for name in (*_METHODS, "resolve_hessian_chunk_size", "preferred_staging_dtype",
                                                            "_wait_partial_ready", "_record_partial_ready", "_cuda_event_for")},
    }


def _chain_digest(functions: dict[str, Callable]) -> str:
    digests = [f"{name}={source_digest(fn)}" for name, fn in sorted(functions.items())]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


def chain_mismatch() -> str | None:
    """Why the installed GPTQModel's Hessian hook chain may not be batched (None: it may)."""
    try:
        functions = _chain_functions()
    except (ImportError, AttributeError) as exc:
        return f"a function of GPTQModel's Hessian hook chain is missing ({exc})"
    missing = [name for name, fn in functions.items() if source_digest(fn) is None]
    if missing:
        return f"the source of {', '.join(missing)} cannot be read"
    if _chain_digest(functions) != HOOK_CHAIN_DIGEST:
        return "GPTQModel's Hessian hook chain differs from 7.6.0's (the hooks run one by one)"
    return None


def _cells(fn: Callable) -> dict[str, Any] | None:
    try:
        return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ())}
    except ValueError:  # an empty cell
        return None


def _unwrapped(cls: type, name: str) -> Any:
    """``cls.name`` without the stage clock's timing wrapper (``kernels.record_gptq_kernels``)."""
    method = getattr(cls, name, None)
    return getattr(method, "__wrapped__", method)


def _plain_task(task: Any) -> bool:
    cls = type(task)
    return (
        all(_unwrapped(cls, name) is fn for name, fn in zip(_METHODS, _Chain.methods))
        and isinstance(task.module, nn.Linear)
        and not task._tp_pad_cols
        and task.qcfg.hessian.chunk_size is None
        and task.qcfg.hessian.chunk_bytes is None
    )


def inner_kind(module: nn.Module, rows: torch.Tensor) -> tuple[BatchedForwardHook, object, object] | None:
    """``(kind, processor, extra)`` when this call of ``module``'s GPTQModel hook may run batched."""
    hook = module.__dict__.get("forward_hook")
    if hook is None:
        return None  # no hook set: the inner hook does nothing
    region = _Chain.wrappers.get(getattr(hook, "__code__", None))
    if region is None or module.__dict__.get("forward_hook_last") or rows.dim() != 2:
        return _by_hook()
    cells = _cells(hook)
    inner = cells and cells.get("inner_hook")
    inner_cells = _cells(inner) if inner is not None else None
    if not inner_cells or inner_cells.get("capture_nvfp4"):
        return _by_hook()
    processor, code = cells["processor"], getattr(inner, "__code__", None)
    if inner_cells.get("self") is not processor:
        return _by_hook()
    extra = (cells["self"], region, cells["hook_source"])
    if code is _Chain.skip:
        return _KIND, processor, (*extra, None)
    task = getattr(processor, "tasks", {}).get(inner_cells.get("name"))
    if code is not _Chain.tmp or task is None or not _plain_task(task):
        return _by_hook()
    return _KIND, processor, (*extra, task)


def _by_hook() -> None:
    with _STATS_LOCK:
        _LAST.by_hook += 1
    return None


def _record_times(members: list, seconds: float) -> None:
    """One region-timer record per hook, as each wrapper makes one, the batch's time shared out."""
    share = seconds / len(members)
    for _, (looper, region, source, _task), *_ in members:
        timer = getattr(looper.gptq_model, "quant_region_timer", None)
        if timer:
            timer.record(region, share, source=source)


def _run(processor: object, members: list) -> None:
    """What each member's hook chain does, for all the members of one grouped call."""
    loopers = {id(extra[0]): extra[0] for _, extra, *_ in members}
    if any(looper._get_processor_hooks_paused(processor) for looper in loopers.values()):
        return  # every wrapper returns at once
    start = time.perf_counter()
    leaders = [m for m in members if m[1][3] is not None]
    products = handed = 0
    with stage("hessian"):
        if leaders:
            products, handed = _accumulate(leaders)
    with _STATS_LOCK:
        _LAST.batched += len(leaders) - handed
        _LAST.products += products
        _LAST.by_hook += handed
        _LAST.followers += len(members) - len(leaders)
    _record_times(members, time.perf_counter() - start)


def _accumulate(leaders: list) -> tuple[int, int]:
    """``GPTQ.add_batch`` of every leader's rows: products from one float32 copy per role input;
    returns the products computed and the leaders handed to their own hooks.

    A CUDA out-of-memory while computing a product hands that member and the ones after it to
    their own hooks (GPTQModel's ``add_batch`` then falls back to a CPU Hessian, as without
    batching); what was queued before is added first, so no accumulation is lost or doubled."""
    by_rows: dict[int, tuple[torch.Tensor, dict[tuple[int, int], list]]] = {}
    for member in leaders:
        _, _, rows, start, size = member
        by_rows.setdefault(id(rows), (rows, {}))[1].setdefault((start, size), []).append(member)
    tasks = {id(m[1][3]): m[1][3] for m in leaders}
    done: set[int] = set()
    products = 0
    with ExitStack() as locks:
        for key in sorted(tasks):  # one order for every thread: no lock cycle (the locks are re-entrant)
            locks.enter_context(tasks[key].lock)
        adds = QueuedAdds(PRODUCT_BUDGET)
        devices = set()
        try:
            for rows, spans in by_rows.values():
                devices.add(rows.device)
                mat32 = rows.contiguous().to(dtype=torch.float32)  # the hook's reshape(-1, F).contiguous() and .to(float32)
                for (x_t, x), members in zip(gram_operands(mat32, list(spans)), spans.values()):
                    if x.shape[0] == 0:
                        done.update(id(m) for m in members)  # add_batch returns at once for no rows
                        continue
                    product = torch.matmul(x_t, x)  # compute_hessian_xtx, unchunked
                    for i, member in enumerate(members):  # a partial kept whole gets a product of its own
                        _note_batch(member[1][3], rows.device, product if i == 0 else product.clone(), x.shape[0], rows.dtype, adds)
                        done.add(id(member))
                    products += 1
                del mat32
        except torch.OutOfMemoryError:
            adds.flush()
            _mark_ready(devices, tasks)
            rest = [m for m in leaders if id(m) not in done]
            logger.warning("CUDA out of memory in the batched GPTQ Hessians: %d hook(s) run one by one", len(rest))
            for module, _extra, rows, start, size in rest:
                _hook_itself(module, rows[start:start + size])
            return products, len(rest)
        adds.flush()
        _mark_ready(devices, tasks)
    return products, 0


def _hook_itself(module: nn.Module, rows: torch.Tensor) -> None:
    """The module's own GPTQ hook (``tmp``; the wrapper's checks were made for the batch)."""
    inner = _cells(module.__dict__["forward_hook"])["inner_hook"]
    inner(module, (rows,), rows.new_empty(0))  # GPTQ's add_batch of a Linear never reads the output


def _mark_ready(devices: set, tasks: dict) -> None:
    """One event after the queued adds, as each ``add_batch`` records one after its own."""
    for dev in devices:
        event = _Chain.GPTQ._cuda_event_for(dev)
        if event is not None:
            event.record(torch.cuda.current_stream(dev))
        for task in tasks.values():
            if dev in task._device_hessian_partials:
                task._device_hessian_partial_ready[dev] = event


def _note_batch(task: Any, dev: torch.device, xtx: torch.Tensor, rows: int, dtype: torch.dtype, adds: QueuedAdds) -> None:
    """``add_batch``'s bookkeeping under the task's lock (held by the caller); the add is queued."""
    task._borrow_workspace_stage_dtype = task.preferred_staging_dtype(dtype, dev)
    task._borrow_workspace_last_chunk_rows = rows
    task.fwd_counter += 1
    existing = task._device_hessian_partials.get(dev)
    if existing is None:
        task._device_hessian_partials[dev] = xtx
    else:
        task._wait_partial_ready(dev)
        adds.add([existing], xtx)
    task._device_sample_counts[dev] = task._device_sample_counts.get(dev, 0) + rows
    task.nsamples += rows
    task._hessian_dirty = True


_KIND = BatchedForwardHook(match=lambda hook: None, run=_run)


@contextmanager
def gptq_hessian_batching() -> Iterator[Callable | None]:
    """Yield the ``inner_kind`` that lets the grouped forward batch GPTQModel's Hessian hooks (None,
    with a warning, when the installed hook chain is not the one this was checked against)."""
    problem = chain_mismatch()
    if problem is not None:
        logger.warning("GPTQ Hessians are accumulated one hook call at a time: %s", problem)
        yield None
        return
    from gptqmodel.looper.gptq_processor import GPTQProcessor
    from gptqmodel.looper.module_looper import ModuleLooper
    from gptqmodel.quantization.gptq import GPTQ

    _Chain.GPTQ = GPTQ
    _Chain.wrappers = {wrapper_code(ModuleLooper._masked_pre_hook_wrapper, "pre_hook"): "forward_pre_hook",
                       wrapper_code(ModuleLooper._masked_hook_wrapper, "hook"): "forward_hook"}
    _Chain.tmp = wrapper_code(GPTQProcessor.pre_process_fwd_hook, "tmp")
    _Chain.skip = wrapper_code(GPTQProcessor.pre_process_fwd_hook, "skip")
    _Chain.methods = tuple(_unwrapped(GPTQ, name) for name in _METHODS)
    global _LAST
    _LAST = HessianBatching()
    try:
        yield inner_kind
    finally:
        logger.debug("GPTQModel Hessians: %s", _LAST.as_dict())
