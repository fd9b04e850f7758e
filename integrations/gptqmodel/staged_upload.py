"""Checkpoint tensors copied to the GPU through pinned staging buffers instead of one pageable copy each.

GPTQModel 7.6 loads a layer from its lazy checkpoint source twice: the whole layer before it is
calibrated (``pre_quantize``) and each module again before its calibration forward (role
``forward``). Both go through ``LazyTurtle._copy_checkpoint_tensors_into_submodule``, which copies
each tensor read from the checkpoint (a view of the file's memory map) into the module on the GPU
with ``target.copy_(source)``: a pageable host-to-device copy, synchronous for the host. Two
Qwen3-30B-A3B layers made 6,263 such copies, 2.7 s of the main thread on an H200 (sampled profile
of round 12).

Inside :class:`StagedUpload` (a ``TorchFunctionMode`` of the calling thread only) such a
``copy_`` of a large contiguous CPU tensor into a contiguous CUDA tensor of the same dtype and shape
copies the source into one of two reused pinned buffers on the host and queues an asynchronous
copy from there, so the host fills one buffer while the GPU empties the other. Leaving the block
waits for every queued copy, so when ``_copy_checkpoint_tensors_into_submodule`` returns its
tensors hold their values, as after GPTQModel's own copies. Anything else (small tensors, other
dtypes or devices, broadcasting, non-contiguous or subclassed tensors) is GPTQModel's own
``copy_``. The values written are the same bytes.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .layer_offload import Staging

logger = logging.getLogger(__name__)

__all__ = ["MIN_BYTES", "StagedUpload", "UploadStats", "lean_checkpoint_copy"]

#: Tensors smaller than this keep GPTQModel's own copy (their pageable copy is cheap).
MIN_BYTES = 1 << 20

#: Target device types whose copies are staged (tests add "cpu": their staging is not pinned).
DEVICE_TYPES = frozenset({"cuda"})

_COPY = torch.Tensor.copy_


@dataclass
class UploadStats:
    """What the staged checkpoint upload did in one run."""

    calls: int = 0  # _copy_checkpoint_tensors_into_submodule calls that ran under StagedUpload
    tensors: int = 0  # ... their copies that went through the staging buffers
    bytes: int = 0
    seconds: float = 0.0  # wall time of those calls (GPTQModel's own work in them included)
    left_to_copy: int = 0  # copies in those calls left to Tensor.copy_ (small, other kinds)
    stock: int = 0  # calls left to GPTQModel's own copies (another model or module, not CUDA)
    failed: int = 0  # ... of them because staging raised (then the part stays off for the run)


def _plain(t: Any) -> bool:
    return (type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided and not t.is_quantized
            and t.is_contiguous())


class StagedUpload(TorchFunctionMode):
    """Inside the block, this thread's large host-to-device ``Tensor.copy_`` calls are staged.

    ``staging``: the two buffers (pinned on CUDA); each copy is cut into pieces of at most one
    buffer. Leaving the block waits until every staged copy has arrived."""

    def __init__(self, staging: Staging, min_bytes: int | None = None):
        super().__init__()
        self.staging = staging
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.tensors = 0
        self.bytes = 0
        self.left = 0
        self._buffers: list[torch.Tensor] = []
        self._current = 0  # buffer being filled
        self._used = 0  # bytes of it handed out since it was last waited for
        self._pending: list[list[torch.cuda.Event]] = [[], []]  # per buffer: copies still reading it

    def __enter__(self) -> StagedUpload:
        self.staging.lock.acquire()
        try:
            self._buffers = self.staging.get()
            super().__enter__()
        except BaseException:
            self.staging.lock.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            try:
                for k in (0, 1):
                    self._wait(k)
            finally:
                self.staging.lock.release()

    def _wait(self, k: int) -> None:
        for event in self._pending[k]:
            event.synchronize()
        self._pending[k] = []

    def _eligible(self, dst: Any, src: Any) -> bool:
        return (isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor) and _plain(dst) and _plain(src)
                and dst.device.type in DEVICE_TYPES and src.device.type == "cpu" and dst.dtype == src.dtype
                and dst.shape == src.shape and not (src.device.type == "cpu" and src.is_pinned())
                and dst.numel() * dst.element_size() >= self.min_bytes and not dst.requires_grad)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _COPY and len(args) == 2 and set(kwargs) <= {"non_blocking"}:
            if self._eligible(args[0], args[1]):
                return self._upload(args[0], args[1])
            self.left += 1
        return func(*args, **kwargs)

    def _upload(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        n = src.numel() * src.element_size()
        source = src.reshape(-1).view(torch.uint8)
        target = dst.view(-1).view(torch.uint8)
        cap = self.staging.nbytes
        start = 0
        while start < n:
            if self._used == cap:
                self._current ^= 1
                self._wait(self._current)  # the GPU has read everything queued from this buffer
                self._used = 0
            length = min(n - start, cap - self._used)
            piece = self._buffers[self._current][self._used:self._used + length]
            piece.copy_(source[start:start + length])
            target[start:start + length].copy_(piece, non_blocking=True)
            if dst.is_cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(dst.device))
                self._pending[self._current].append(event)
            self._used += length
            start += length
        self.tensors += 1
        self.bytes += n
        return dst


def lean_checkpoint_copy(original: Callable, is_ours: Callable[[Any, nn.Module, Any], bool], staging: Staging,
                         stats: UploadStats, lock: threading.Lock) -> Callable:
    """``LazyTurtle._copy_checkpoint_tensors_into_submodule`` under :class:`StagedUpload` when the
    target is ours (``is_ours(target_model, target_submodule, module_path)``) and on a staged device
    type; anything else, or after staging failed once, ``original``."""
    state = {"off": False}

    @functools.wraps(original)
    def _copy_checkpoint_tensors_into_submodule(self, *, target_model, target_submodule, module_path, device,
                                                **kwargs):
        call = functools.partial(original, self, target_model=target_model, target_submodule=target_submodule,
                                 module_path=module_path, device=device, **kwargs)
        if (state["off"] or torch.device(device).type not in DEVICE_TYPES
                or not is_ours(target_model, target_submodule, module_path)):
            with lock:
                stats.stock += 1
            return call()
        begin = time.perf_counter()
        try:
            with staging.lock:
                staging.get()  # allocate the pinned buffers before anything is copied
        except RuntimeError as exc:  # e.g. no pinned memory
            state["off"] = True
            with lock:
                stats.stock += 1
                stats.failed += 1
            logger.warning("staged checkpoint upload failed (%s); GPTQModel's own copies load the layers instead", exc)
            return call()
        with StagedUpload(staging) as mode:
            loaded = call()
        with lock:
            stats.calls += 1
            stats.tensors += mode.tensors
            stats.bytes += mode.bytes
            stats.left_to_copy += mode.left
            stats.seconds += time.perf_counter() - begin
        return loaded

    return _copy_checkpoint_tensors_into_submodule
