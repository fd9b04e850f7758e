"""A decoder layer moved back to the CPU in a few large copies instead of one per tensor.

After a layer is quantized GPTQModel 7.6 moves it to the CPU (``BaseQModel.post_quantize``:
``module.to("cpu")``). That is one pageable, synchronous device-to-host copy per tensor: with the
dequantized weights of a few hundred expert projections per layer it took about 1.2 s per
Qwen3-30B-A3B layer on an H200, on the main thread. :func:`staged_to_cpu` gives every tensor the
same CPU copy (same values, dtype, shape and contiguous layout, fresh ordinary CPU memory) through
two reused pinned staging buffers: the device fills one with asynchronous copies while the host
copies the other out, then the module's tensors are swapped by ``Module._apply`` exactly as
``module.to`` swaps them (the same ``Parameter`` objects, their gradients, buffers).

What it does not handle exactly like ``module.to`` it leaves to ``module.to``: non-contiguous
tensors, tensor subclasses, non-strided layouts, quantized dtypes. Nothing of the module changes before every copy
has arrived, so an error or Ctrl-C part way leaves the module as it was.

The other way, :func:`lean_pre_quantize` (the ``layer_onload`` part): GPTQModel loads layer 0 on the CPU
for the input capture and ``pre_quantize`` moves it to the GPU with ``module.to`` (one pageable
host-to-device copy per tensor, 1.2 GB at Qwen3-30B-A3B shape, on the main thread). :func:`stage_uploads`
copies the tensors into the same two pinned buffers on the host while the GPU reads the other one,
into fresh device tensors, and ``Module._apply`` puts them in place as ``module.to`` does.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["OffloadStats", "StagedCopies", "Staging", "lean_post_quantize", "lean_pre_quantize", "stage_copies",
           "stage_uploads", "staged_to_cpu", "swap_in"]

#: Bytes per pinned staging buffer (two are kept).
STAGING_BYTES = 64 << 20


@dataclass
class OffloadStats:
    """What the staged layer offload did in one run."""

    layers: int = 0  # layers moved by staged_to_cpu
    tensors: int = 0  # ... their tensors that went through the staging buffers
    bytes: int = 0
    seconds: float = 0.0
    left_to_to: int = 0  # tensors of those layers left to Tensor.to (non-contiguous, subclass, other layout)
    stock: int = 0  # layers left to GPTQModel's own post_quantize
    failed: int = 0  # ... of them because the staged move raised (the layer was left as it was)


class Staging:
    """Two staging buffers of ``nbytes`` each, allocated on first use (pinned when ``pin``)."""

    def __init__(self, nbytes: int = STAGING_BYTES, pin: bool = True):
        self.nbytes = nbytes
        self.pin = pin
        self.buffers: list[torch.Tensor] = []
        self.lock = threading.Lock()  # one transfer at a time uses the buffers

    def get(self) -> list[torch.Tensor]:
        if not self.buffers:
            self.buffers = [torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pin) for _ in range(2)]
        return self.buffers

    def release(self) -> None:
        self.buffers = []


def _stageable(t: torch.Tensor) -> bool:
    return (type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided and not t.is_quantized
            and t.is_contiguous())


def _module_tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    """Every tensor ``Module._apply`` hands its function: parameters, their gradients, buffers."""
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                yield p
                if p.grad is not None:
                    yield p.grad
        for b in m._buffers.values():
            if b is not None:
                yield b


def _fill(staging: torch.Tensor, pieces: list[_Piece]) -> list[torch.Tensor]:
    """Queue the device-to-staging copies of ``pieces``; returns their staging views."""
    views = [staging[p.offset:p.offset + p.length] for p in pieces]
    torch._foreach_copy_(views, [p.source for p in pieces], non_blocking=True)
    return views


def _drain(views: list[torch.Tensor], pieces: list[_Piece]) -> None:
    torch._foreach_copy_([p.dest for p in pieces], views)


@dataclass
class _Piece:
    source: torch.Tensor  # bytes of the source tensor (all of it, or the part in this batch)
    dest: torch.Tensor  # the same bytes of its CPU copy
    offset: int  # where they sit in the staging buffer
    length: int


@dataclass
class StagedCopies:
    """CPU copies of a module's tensors, made by :func:`stage_copies`; the module is not changed yet."""

    copies: dict[int, torch.Tensor]  # id(source tensor) -> its CPU copy
    chosen: set[int]  # id() of every tensor to move (the copied ones and those left to Tensor.to)
    staged: int  # tensors copied through the staging buffers
    nbytes: int  # their bytes
    left: int  # tensors left to Tensor.to (non-contiguous, subclass, other layout)


def staged_to_cpu(module: nn.Module, staging: Staging, select: Callable[[torch.Tensor], bool] | None = None
                  ) -> tuple[int, int, int]:
    """``module.to("cpu")`` for the tensors ``select`` picks (default: those on a CUDA device), the
    contiguous plain ones through ``staging``; the rest by ``Tensor.to``. Returns (tensors staged,
    bytes staged, tensors left to ``Tensor.to``)."""
    staged = stage_copies(module, staging, select)
    swap_in(module, staged)
    return staged.staged, staged.nbytes, staged.left


def _chosen(module: nn.Module, select: Callable[[torch.Tensor], bool]) -> list[torch.Tensor]:
    """The distinct tensors of ``module`` that ``select`` picks, in ``Module._apply`` order."""
    order: list[torch.Tensor] = []
    seen: set[int] = set()
    for t in _module_tensors(module):
        if id(t) not in seen and select(t):
            seen.add(id(t))
            order.append(t)
    return order


def _plan(staged: list[torch.Tensor], cap: int, device: torch.device | str
          ) -> tuple[dict[int, torch.Tensor], list[list[_Piece]], int]:
    """A fresh copy of each of ``staged`` on ``device`` and the batches (each at most ``cap`` bytes,
    a tensor split over batches where it does not fit) that carry their bytes through a staging
    buffer. Returns (id(source) -> its copy, the batches, bytes)."""
    copies: dict[int, torch.Tensor] = {}
    total = 0
    batches: list[list[_Piece]] = [[]]
    used = 0
    for t in staged:
        copy = torch.empty(t.shape, dtype=t.dtype, device=device)
        copies[id(t)] = copy
        n = t.numel() * t.element_size()
        total += n
        if n == 0:
            continue
        src, dst = t.view(-1).view(torch.uint8), copy.view(-1).view(torch.uint8)
        start = 0
        while start < n:
            if used == cap:
                batches.append([])
                used = 0
            length = min(n - start, cap - used)
            whole = length == n
            batches[-1].append(_Piece(src if whole else src[start:start + length],
                                      dst if whole else dst[start:start + length], used, length))
            used += length
            start += length
    return copies, batches, total


def stage_copies(module: nn.Module, staging: Staging, select: Callable[[torch.Tensor], bool] | None = None
                 ) -> StagedCopies:
    """The CPU copies :func:`staged_to_cpu` puts in place, made without changing ``module``."""
    if select is None:
        select = lambda t: t.device.type == "cuda"  # noqa: E731
    order = _chosen(module, select)
    staged = [t for t in order if _stageable(t)]
    # Few Python-level tensor calls per tensor: each gives the GIL back and must take it again,
    # which costs more than the copy while other threads hold it (GPTQModel's workers).
    with torch.no_grad(), staging.lock:
        buffers = staging.get()
        copies, batches, total = _plan(staged, staging.nbytes, "cpu")
        # Batch k fills buffer k % 2 on each source's current stream; the host drains batch k - 1
        # meanwhile. Sources of one batch may sit on several devices: wait for each.
        pending: tuple[list[torch.Tensor], list[_Piece], list[torch.cuda.Event]] | None = None
        for k, pieces in enumerate(batches):
            if not pieces:
                continue
            views = _fill(buffers[k % 2], pieces)
            events = []
            for device in {p.source.device for p in pieces if p.source.device.type == "cuda"}:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                events.append(event)
            if pending is not None:
                for event in pending[2]:
                    event.synchronize()
                _drain(pending[0], pending[1])
            pending = (views, pieces, events)
        if pending is not None:
            for event in pending[2]:
                event.synchronize()
            _drain(pending[0], pending[1])
    return StagedCopies(copies, {id(t) for t in order}, len(staged), total, len(order) - len(staged))


def _upload(views: list[torch.Tensor], pieces: list[_Piece], non_blocking: bool) -> None:
    """Host copies of ``pieces``' CPU bytes into the staging ``views``, then the staging-to-device copies."""
    torch._foreach_copy_(views, [p.source for p in pieces])
    torch._foreach_copy_([p.dest for p in pieces], views, non_blocking=non_blocking)


def stage_uploads(module: nn.Module, staging: Staging, device: torch.device | str,
                  select: Callable[[torch.Tensor], bool] | None = None) -> StagedCopies:
    """Copies on ``device`` of the tensors of ``module`` that ``select`` picks (default: those not on
    ``device``, what ``module.to(device)`` moves), made without changing ``module``: the contiguous
    plain CPU ones through ``staging`` (the host fills one buffer while the device reads the other),
    the rest left to ``Tensor.to``. Every copy has arrived when this returns."""
    device = torch.device(device)
    order = _chosen(module, select if select is not None else lambda t: t.device != device)
    staged = [t for t in order if t.device.type == "cpu" and _stageable(t)]
    cuda = device.type == "cuda"
    with torch.no_grad(), staging.lock:
        buffers = staging.get()
        copies, batches, total = _plan(staged, staging.nbytes, device)
        stream = torch.cuda.current_stream(device) if cuda else None
        read: list[torch.cuda.Event | None] = [None, None]  # the device has read buffer k of its last batch
        for k, pieces in enumerate(batches):
            if not pieces:
                continue
            if read[k % 2] is not None:
                read[k % 2].synchronize()
            views = [buffers[k % 2][p.offset:p.offset + p.length] for p in pieces]
            _upload(views, pieces, non_blocking=cuda)
            if cuda:
                read[k % 2] = torch.cuda.Event()
                read[k % 2].record(stream)
        if cuda:  # other streams (GPTQModel's workers) read the layer next: wait for every copy
            stream.synchronize()
    return StagedCopies(copies, {id(t) for t in order}, len(staged), total, len(order) - len(staged))


def swap_in(module: nn.Module, staged: StagedCopies, device: torch.device | str = "cpu") -> None:
    """Put ``staged``'s copies in place with ``Module._apply``, as ``module.to(device)`` does (the
    chosen tensors it has no copy of go by ``Tensor.to``)."""

    def to_device(t: torch.Tensor) -> torch.Tensor:
        copy = staged.copies.get(id(t))
        if copy is not None:
            return copy
        return t.to(device) if id(t) in staged.chosen else t

    module._apply(to_device)


def lean_post_quantize(original: Callable, gptq_model: Any, layer_has_experts: Callable[[nn.Module], bool],
                       staging: Staging, stats: OffloadStats, lock: threading.Lock) -> Callable:
    """``BaseQModel.post_quantize`` that moves a layer holding defused experts with :func:`staged_to_cpu`.

    Anything else (another model, a layer without our experts, GPTQModel's pinned-bounce modes
    ``w4afp8``/``w4a_nvfp4``, a layer with meta tensors, one already on the CPU, no CUDA) goes to
    ``original``."""
    from gptqmodel.utils.model import _module_has_meta_tensors, get_device

    cpu = torch.device("cpu")

    @functools.wraps(original)
    def post_quantize(self, module):
        if (self is not gptq_model or not isinstance(module, nn.Module) or not torch.cuda.is_available()
                or getattr(self.quantize_config, "activation_mode", None) in {"w4afp8", "w4a_nvfp4"}
                or not layer_has_experts(module) or get_device(module) == cpu
                or _module_has_meta_tensors(module)):  # move_to's own rule for its offload path
            with lock:
                stats.stock += 1
            return original(self, module)
        return _staged_move(module, lambda: stage_copies(module, staging), cpu,
                            lambda: original(self, module), stats, lock, "offload")

    return post_quantize


def lean_pre_quantize(original: Callable, gptq_model: Any, layer_has_experts: Callable[[nn.Module], bool],
                      staging: Staging, stats: OffloadStats, lock: threading.Lock) -> Callable:
    """``BaseQModel.pre_quantize`` that moves a layer holding defused experts from the CPU to the
    quantize device with :func:`stage_uploads` where GPTQModel would call ``move_to`` (layer 0, which
    GPTQModel loads on the CPU for the input capture): the same Parameter objects, their data on the
    device, as ``module.to`` leaves them.

    Anything else (another model, a layer without our experts, one with meta tensors, which GPTQModel
    materializes, one not on the CPU, a quantize device that is not CUDA, no CUDA) goes to ``original``."""
    from gptqmodel.utils.model import _module_has_meta_tensors, get_device

    cpu = torch.device("cpu")

    @functools.wraps(original)
    def pre_quantize(self, module):
        target = getattr(getattr(self, "quantize_config", None), "device", None)
        if (self is not gptq_model or not isinstance(module, nn.Module) or not torch.cuda.is_available()
                or not isinstance(target, (torch.device, str)) or torch.device(target).type != "cuda"
                or not layer_has_experts(module) or _module_has_meta_tensors(module) or get_device(module) != cpu):
            with lock:
                stats.stock += 1
            return original(self, module)
        device = torch.device(target)
        return _staged_move(module, lambda: stage_uploads(module, staging, device), device,
                            lambda: original(self, module), stats, lock, "upload")

    return pre_quantize


def _staged_move(module: nn.Module, stage: Callable[[], StagedCopies], device: torch.device,
                 fallback: Callable[[], Any], stats: OffloadStats, lock: threading.Lock, what: str) -> Any:
    """``module``'s tensors swapped for ``stage()``'s copies on ``device``, counted in ``stats``; when
    staging raises (e.g. no pinned or device memory left; the layer is unchanged) GPTQModel's own move
    (``fallback``) runs instead, with one warning per run."""
    begin = time.perf_counter()
    try:
        staged = stage()
    except RuntimeError as exc:
        with lock:
            stats.stock += 1
            stats.failed += 1
            first = stats.failed == 1
        if first:
            logger.warning("staged layer %s failed (%s); GPTQModel's module.to moves the layers instead", what, exc)
        return fallback()
    swap_in(module, staged, device)
    with lock:
        stats.layers += 1
        stats.tensors += staged.staged
        stats.bytes += staged.nbytes
        stats.left_to_to += staged.left
        stats.seconds += time.perf_counter() - begin
    return module
