"""The ``layer_stage`` part of :func:`~.overhead.lean_bookkeeping` (opt-in, with ``layer_reads``): the next decoder
layer's read-ahead bytes copied to the quantize device after the current layer's last subset forward, so that the
layer's load copies device to device.

With ``layer_reads`` alone, the load of layer ``i+1`` copies each of its tensors from the read-ahead host buffers on
GPTQModel's main thread: 0.57-0.64 s for one Qwen3-30B-A3B layer (1.2 GB) on an H100, the largest step of the layer
change (``gptqmodel_cuda_2layers_round55a_h100x1.json``). In GPTQModel's default flow that copy goes into host memory
(the layer moves to the GPU afterwards) and there is nothing to stage; where the load goes straight to the GPU (with
``capture_lazy``), each copy from ordinary (pageable) memory is staged by the driver through buffers of its own.
Reading into pinned memory instead made such copies fast, but pinning 1.2 GB slowed every other thread's CUDA calls
while it ran (:data:`~.layer_reads.PIN`).

Here, once layer ``i`` has run its last subset forward (GPTQModel's ``forward_end`` subset event, the point
``layer_ahead`` uses; the layer's large gate/up Hessians are solved and freed by then, so the copy should sit below
the run's peak), a background thread copies the read's host pieces (64 MiB each, some twenty calls that release the
interpreter lock while they copy) into device memory on a CUDA stream of its own and waits for them. The load of layer
``i+1`` then gets views of those device pieces from ``safe_open(...).get_tensor`` (the same bytes, dtypes and shapes)
and GPTQModel's own ``copy_`` into the layer's tensors runs device to device. GPTQModel's load, checks and
conversions are its own; only where the source bytes sit changes.

With ``capture_lazy`` on, the first layer holding our experts is read from the block's start and loaded straight to
the quantize device in the first ``pre_quantize``; its read is copied to that device as soon as it is read (the
device holds little more than the embeddings then), so that load is device to device too.

The copy goes only to the device the layer before was loaded to (the first layer's: the quantize device), and only when that device has room for
:data:`ROOM` times the layer's bytes (free memory plus what PyTorch's allocator holds unused); otherwise
(``stats.refused``) or when the copy raises (out of memory, say: logged, ``stats.failed``), the load copies from host
memory as with ``layer_reads`` alone. A load to another device gets the host views. A load waits for a copy still
running (it would copy the same bytes itself). On leaving the block a copy still running is waited for.

Measured on one H100 (round 57, ``gptqmodel_cuda_2layers_round57_h100x1.json``): without ``capture_lazy`` nothing is
staged, since GPTQModel 7.6 loads each layer into host memory (every layer refused: "the layer before loaded to cpu");
with it both layers were staged and the layer change was 0.4 s shorter, but layer 0's finalizes then ran beside
layer 1's first subsets, which grew by as much (the main thread and the finalize workers share one interpreter lock).
No faster, so the part stays opt-in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from .layer_ahead import after_last_forward_of, free_bytes
from .layer_reads import LayerReads, _Read, exact_device, layer_index

logger = logging.getLogger(__name__)

__all__ = ["DEVICES", "ROOM", "LayerStage", "LayerStageStats", "copy_pieces", "room_for"]

#: Device types a read is copied to.
DEVICES = frozenset({"cuda"})
#: The device must have this many times the layer's bytes free (counting its allocator's unused blocks).
ROOM = 2.0


@dataclass
class LayerStageStats:
    """What the ``layer_stage`` part did in one run."""

    staged: int = 0  # reads copied to the device
    bytes: int = 0  # ... their bytes
    seconds: float = 0.0  # background wall seconds of those copies
    failed: int = 0  # copies that raised (the load copied from host memory)
    refused: Counter = field(default_factory=Counter)  # why a read was not copied -> times

    def as_dict(self) -> dict[str, Any]:
        return {"staged": self.staged, "bytes": self.bytes, "seconds": round(self.seconds, 4), "failed": self.failed,
                "refused": dict(self.refused)}


def room_for(nbytes: int, device: torch.device, room: float = ROOM) -> bool:
    """Whether ``device`` has ``room`` times ``nbytes`` free, counting the blocks PyTorch's allocator holds unused
    (any non-CUDA device: yes)."""
    if device.type != "cuda":
        return True
    free = free_bytes(device)
    return free is not None and free >= room * nbytes


def copy_pieces(pieces: list[torch.Tensor], device: torch.device, stop: threading.Event | None = None) -> list[torch.Tensor]:
    """Copies of the host byte ``pieces`` on ``device``, each complete when this returns. On CUDA the copies run on a
    stream of their own (allocated on this thread's current stream, which the loads' ``record_stream`` then covers);
    once ``stop`` is set the pieces not yet copied raise instead."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    copies: list[torch.Tensor] = []
    try:
        for piece in pieces:
            if stop is not None and stop.is_set():
                raise RuntimeError("layer stage stopped")
            copy = torch.empty(piece.numel(), dtype=torch.uint8, device=device)
            copies.append(copy)
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                copy.copy_(piece)
    finally:
        if stream is not None:
            stream.synchronize()  # nothing is handed out (or freed, on a raise) before its bytes have landed
    return copies


class LayerStage:
    """The ``layer_stage`` part over one :class:`~.layer_reads.LayerReads` (see the module docstring)."""

    def __init__(self, reads: LayerReads, gptq_model: Any, stats: LayerStageStats, *, room: float = ROOM) -> None:
        self.reads = reads
        self.gptq_model = gptq_model
        self.stats = stats
        self.room = room
        self._warned = False

    def patch_subset_event(self, original: Callable) -> Callable:
        """``ModuleLooper._subset_event_dispatch`` that copies the next layer's read after the last subset forward."""
        return after_last_forward_of(original, self.gptq_model, lambda layer_idx, _names: self.after_last_forward(layer_idx))

    def after_last_forward(self, layer_idx: int) -> None:
        """Layer ``layer_idx`` has run its last subset forward: copy the read of layer ``layer_idx + 1`` to the device
        the layer before it was loaded to (on the read-ahead thread, after the read)."""
        with self.reads.lock:
            ahead = self.reads.ahead
            if ahead is None or layer_index(ahead[0]) != layer_idx + 1:
                why = "no read of the next layer ahead (the last layer, or a layer not read)"
            else:
                why = self._submit(ahead, self.reads.ahead_device, "the layer before loaded to")
        if why is not None:
            self._refuse(why)

    def stage_first(self, path: str | None, device: Any) -> None:
        """The first layer's read from the block's start (``layer_reads.first``: its load comes straight to the quantize
        ``device`` with ``capture_lazy``): copy it there as soon as it is read. The device is nearly empty then, so no
        wait for a subset event."""
        device = exact_device(device)
        with self.reads.lock:
            ahead = self.reads.ahead
            if path is None or ahead is None or ahead[0] != path:
                why = "no read of the first layer ahead"
            else:
                why = self._submit(ahead, device, "the quantize device is")
        if why is not None:
            self._refuse(why)

    def _submit(self, ahead: tuple[str, Future], device: torch.device | None, where: str) -> str | None:
        """Queue the copy of the read ahead (under the reads' lock): None, or why not."""
        if self.reads.closed:
            return "the block is closing"
        if device is None or device.type not in DEVICES:
            return f"{where} {device} (copied only to {', '.join(sorted(DEVICES))})"
        self.reads.ahead = (ahead[0], self.reads.ahead_pool.submit(self._stage, ahead[1], device))
        return None

    def _stage(self, read_future: Future, device: torch.device) -> _Read:
        """The read (what ``read_future`` gives, raising what it raised), with device copies when they could be made."""
        read: _Read = read_future.result()  # done: it ran on this same single thread before this task
        if not read.pieces or not any(read.tensors.values()):
            self._refuse("nothing read to copy")
            return read
        nbytes = sum(piece.numel() for piece in read.pieces)
        try:
            if not room_for(nbytes, device, self.room):
                self._refuse(f"{device} has no room for {self.room:g}x the layer")
                return read
            t0 = time.perf_counter()
            copies = copy_pieces(read.pieces, device, self.reads.stop)
            read.set_staged(copies)
        except Exception as exc:  # noqa: BLE001 - the load copies from host memory, as without this part
            with self.reads.lock:
                self.stats.failed += 1
            if not self._warned:
                self._warned = True
                logger.warning("copying a read-ahead layer to %s failed (%s); its load copies from host memory", device, exc)
            return read
        with self.reads.lock:
            self.stats.staged += 1
            self.stats.bytes += nbytes
            self.stats.seconds += time.perf_counter() - t0
        return read

    def _refuse(self, why: str) -> None:
        with self.reads.lock:
            self.stats.refused[why] += 1
