"""The ``layer_reads`` part of :func:`~.overhead.lean_bookkeeping`: a decoder layer's checkpoint
tensors read ahead into host memory on background threads, so that the layer's load to the GPU
does not wait for the disk.

GPTQModel 7.6 loads each decoder layer from its lazy checkpoint source (``LazyTurtle``) when it
gets to it (``pre_quantize``, ``_copy_checkpoint_tensors_into_submodule``): per tensor,
``safe_open(shard).get_tensor(name)`` hands out a view of the shard's file mapping and ``copy_``
moves it to the GPU, faulting the mapping in on the loading (main) thread. For one Qwen3-30B-A3B
layer's experts (1.2 GB) on an H200 host that took 0.23 s with the file in the page cache and
0.96 s without (``benchmarks/results/host_reads_cuda_round15.json``).

Here, right after a layer holding our experts is loaded, the layer after it (the same path with
its last index plus one) is read with ``pread`` into host buffers (pieces of :data:`PIECE_BYTES`,
several reader threads, the GIL released while they read) while this one is quantized. When that
layer's load to a CUDA device comes, ``safe_open`` of a shard on the loading thread returns a
handle whose ``get_tensor`` serves each name that was read once, as a view of those buffers: the
file's bytes with the dtype and shape of the shard's header, what ``get_tensor`` returns. The
copies from resident memory took 0.21 s for that layer, whether the file was cached or not (the
read, 0.25 s warm and 0.68 s cold, ran ahead). A load with no read ahead (the first one) reads on
the spot, except the first layer when ``capture_lazy`` loads it straight to the device: it is read
from the block's start, during the input capture (:meth:`LayerReads.read_first`). A load that is not
served drops a read ahead of its own layer (the next layer's read then starts after it).
Everything else (a name not read, read already, at an offset its dtype does not fit, of an
unknown dtype; a shard whose file changed since it was read; a load to the CPU, which might keep
views of the buffers) goes to a real handle, as stock; on a machine without CUDA nothing is
read and every load is stock (``layer_reads.stock`` counts them). GPTQModel still runs its own load,
with its own checks, conversions and writes. A read that fails is dropped with a warning (the load
reads the file as stock does, and raises what stock would); at most one layer is read ahead;
layers over :data:`MAX_LAYER_BYTES` are not read.

:data:`PIN` reads into pinned buffers instead: the copies then took 0.03 s, but pinning 1.2 GB
took 0.67 s of driver time during which another thread's CUDA launches ran 4x slower, and the
whole run was no faster (``gptqmodel_cuda_2layers_round15b_h200x1.json``); off by default.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from defuser_quant.checkpoint.source import raw_header

from .shard_view import DelegatingShard
from .shard_view import file_id as _file_id

logger = logging.getLogger(__name__)

__all__ = ["MAX_LAYER_BYTES", "PIECE_BYTES", "PIN", "LayerLoadScope", "LayerReadStats", "LayerReads",
           "around_whole_layer_loads", "exact_device", "first_layer_path", "layer_index", "read_tensors", "serves_here",
           "whole_layer_load"]

#: Bytes of one pinned buffer piece (a tensor larger than that gets a piece of its own).
PIECE_BYTES = 64 << 20
#: Largest layer (checkpoint bytes) read ahead (two may be held: the one loading, the next); larger ones load as stock.
MAX_LAYER_BYTES = 8 << 30
#: Reader threads per layer read.
READERS = 4
#: Device types whose loads are served from the buffers (a CPU load may keep views of them).
SERVED_DEVICES = frozenset({"cuda"})
#: Read into pinned (page-locked) buffers: the copies to the GPU are DMA transfers, but pinning
#: takes a driver lock the other threads' CUDA calls wait for. Off: ordinary, resident host memory.
PIN = False

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def whole_layer_load(model: nn.Module, holds_experts: Callable[[nn.Module], bool], *, target_model: Any,
                     target_submodule: Any, module_path: Any, recurse: Any) -> bool:
    """Whether a ``_copy_checkpoint_tensors_into_submodule`` call with these arguments loads a whole decoder layer
    of ``model`` that holds our experts (not one module's forward preparation, not another model)."""
    return (target_model is model and bool(recurse) and isinstance(module_path, str) and bool(module_path)
            and isinstance(target_submodule, nn.Module) and holds_experts(target_submodule))


def around_whole_layer_loads(original: Callable, model: nn.Module, holds_experts: Callable[[nn.Module], bool],
                             around: Callable[[], AbstractContextManager]) -> Callable:
    """GPTQModel's ``LazyTurtle._copy_checkpoint_tensors_into_submodule`` run inside ``around()`` when it loads a
    whole layer of ``model`` that holds our experts (:func:`whole_layer_load`); every other call as GPTQModel's."""

    @functools.wraps(original)
    def _copy_checkpoint_tensors_into_submodule(self, *args: Any, **kwargs: Any) -> Any:
        if not whole_layer_load(model, holds_experts, target_model=kwargs.get("target_model"),
                                target_submodule=kwargs.get("target_submodule"),
                                module_path=kwargs.get("module_path"), recurse=kwargs.get("recurse")):
            return original(self, *args, **kwargs)
        with around():
            return original(self, *args, **kwargs)

    return _copy_checkpoint_tensors_into_submodule


class LayerLoadScope:
    """A state that lasts while any whole-layer load runs (:func:`around_whole_layer_loads`; loads on several threads
    at once: from the first one's start to the last one's end): :meth:`_first` runs when the first load starts and
    :meth:`_last` when the last one ends, also when it raises or is interrupted; every load is counted in the
    subclass's ``stats`` (``loads``, ``load_seconds``)."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats
        self._loads = 0
        self._lock = threading.Lock()

    def _first(self) -> None:
        """Called (under the scope's lock) when the first of the loads running at once starts."""

    def _last(self) -> None:
        """Called (under the scope's lock) when the last of the loads running at once ends."""

    @contextmanager
    def during_load(self) -> Iterator[None]:
        """One load: inside the block the state holds (until the last of the loads running at once ends)."""
        with self._lock:
            if self._loads == 0:
                self._first()
            self._loads += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._loads -= 1
                if self._loads == 0:
                    self._last()
                self.stats.loads += 1
                self.stats.load_seconds += time.perf_counter() - t0

    def patch_copy(self, original: Callable, model: nn.Module, holds_experts: Callable[[nn.Module], bool]) -> Callable:
        """GPTQModel's ``LazyTurtle._copy_checkpoint_tensors_into_submodule`` inside :meth:`during_load` while it loads
        a whole layer of ``model`` that holds our experts; every other call as GPTQModel's."""
        return around_whole_layer_loads(original, model, holds_experts, self.during_load)


def serves_here() -> bool:
    """Whether a load on this machine can be served (:data:`SERVED_DEVICES`): without CUDA the part
    reads nothing and every load is GPTQModel's own, as ``layer_offload`` leaves moves to it."""
    return any(kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()) for kind in SERVED_DEVICES)


@dataclass
class LayerReadStats:
    """What the ``layer_reads`` part did in one run."""

    layers: int = 0  # layer loads served from read buffers
    read_ahead: int = 0  # ... of them read ahead in the background
    stock: int = 0  # loads of layers holding our experts left to GPTQModel (to the CPU, no read, no CUDA)
    bytes: int = 0  # bytes read
    read_seconds: float = 0.0  # wall seconds of the reads (background ones included)
    waited_seconds: float = 0.0  # seconds a load waited for its read (and its device copy, with layer_stage)
    tensors_served: int = 0  # get_tensor calls answered from the buffers
    tensors_stock: int = 0  # ... inside served loads, left to a real handle
    unused: int = 0  # reads ahead never used (another layer came, or the block ended)
    failed: int = 0  # reads that raised (the load read the file as stock)
    reasons: dict[str, int] = field(default_factory=dict)  # why a name was not read -> names
    first: str | None = None  # the first layer read ahead at the block's start (capture_lazy), else None
    staged_loads: int = 0  # loads served from device copies of their read (the layer_stage part)


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype | None  # None: a dtype this part does not know (left to safetensors)
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int


_headers: dict[str, tuple[tuple, dict[str, _Entry]]] = {}  # path -> (file id, its tensors), oldest first
_HEADERS_KEPT = 16
_headers_lock = threading.Lock()


def _header(path: str) -> dict[str, _Entry]:
    """The tensors of a safetensors file from its header (absolute byte ranges); kept per file."""
    file_id = _file_id(path)
    with _headers_lock:
        kept = _headers.get(path)
    if kept is not None and kept[0] == file_id:
        return kept[1]
    entries = _parse_header(path)
    with _headers_lock:
        _headers.pop(path, None)
        _headers[path] = (file_id, entries)
        while len(_headers) > _HEADERS_KEPT:
            _headers.pop(next(iter(_headers)))
    return entries


def _parse_header(path: str) -> dict[str, _Entry]:
    header, base = raw_header(path)
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        entries[name] = _Entry(name, _DTYPES.get(info["dtype"]), tuple(info["shape"]), base + start, base + end)
    return entries


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"short read at byte {offset}")
        view, offset = view[n:], offset + n


class _Read:
    """The tensors of one layer read from its shards: each served at most once."""

    def __init__(self) -> None:
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}  # shard path -> name -> view of a piece
        self.file_ids: dict[str, tuple] = {}
        self.checked: dict[str, bool] = {}  # shard path -> the file is still the one read
        self.served: set[tuple[str, str]] = set()
        self.bytes = 0
        self.seconds = 0.0
        self.reasons: Counter[str] = Counter()  # why a name is not served -> names
        self.lock = threading.Lock()
        self.pieces: list[torch.Tensor] = []  # the host buffers the views of ``tensors`` are cut from
        self.staged: dict[str, dict[str, torch.Tensor]] | None = None  # the same views of device copies (layer_stage)
        self.staged_pieces: list[torch.Tensor] = []  # ... those copies, in the order of ``pieces``
        self.use_staged = False  # serve ``staged`` instead of ``tensors`` (set by the load, on its device)

    def take(self, shard: str, name: str) -> tuple[bool, Any]:
        with self.lock:
            tensors = (self.staged if self.use_staged and self.staged is not None else self.tensors).get(shard)
            if tensors is None or name not in tensors or (shard, name) in self.served:
                return False, None
            if shard not in self.checked:
                try:
                    self.checked[shard] = _file_id(shard) == self.file_ids[shard]
                except OSError:
                    self.checked[shard] = False
            if not self.checked[shard]:
                return False, None
            self.served.add((shard, name))
            return True, tensors[name]

    @property
    def staged_device(self) -> torch.device | None:
        """Where the device copies are (None: none made)."""
        return self.staged_pieces[0].device if self.staged is not None and self.staged_pieces else None

    def set_staged(self, copies: list[torch.Tensor]) -> None:
        """Copies of :attr:`pieces` (same sizes, in order) on a device: :attr:`staged` gets the views :attr:`tensors`
        has, each at its byte offset in the copy of the piece it is cut from."""
        copy_of = {piece.data_ptr(): copy for piece, copy in zip(self.pieces, copies)}
        staged: dict[str, dict[str, torch.Tensor]] = {}
        for shard, views in self.tensors.items():
            staged[shard] = {}
            for name, view in views.items():
                start = view.untyped_storage().data_ptr()
                offset = view.data_ptr() - start
                staged[shard][name] = copy_of[start][offset:offset + view.nbytes].view(view.dtype).view(view.shape)
        with self.lock:
            self.staged, self.staged_pieces = staged, copies


def read_tensors(files: dict[str, list[str]], *, pin: bool, readers: ThreadPoolExecutor | None = None,
                 piece_bytes: int = PIECE_BYTES, stop: threading.Event | None = None) -> _Read:
    """Read ``files`` (shard path -> tensor names) into (pinned, when ``pin``) host buffers.

    Names of a dtype this part does not know, or whose offset in the file does not fit their dtype
    (safetensors aligns its data; a hand-made file may not), are left out, counted in ``reasons``.
    Tensors contiguous in the file are read with one ``pread``; the reads run on ``readers`` when
    given. Once ``stop`` is set, the reads not yet started raise instead (a Ctrl-C does not wait
    for a whole layer to be read)."""
    read = _Read()
    t0 = time.perf_counter()
    jobs: list[tuple[str, int, memoryview]] = []  # (shard, file offset, buffer to fill)
    handles: dict[str, int] = {}
    try:
        for shard, names in files.items():
            file_id = _file_id(shard)
            header = _header(shard)
            entries = sorted((header[n] for n in names if n in header), key=lambda e: e.start)
            for n in names:
                if n not in header:
                    read.reasons["not in the shard header"] += 1
            wanted = []
            for e in entries:
                if e.dtype is None:
                    reason = "dtype unknown to the part"
                elif e.end - e.start != math.prod(e.shape) * e.dtype.itemsize:
                    reason = "byte range does not fit its dtype and shape"  # safetensors' own error, at its read
                else:
                    wanted.append(e)
                    continue
                read.reasons[reason] += 1
            views: dict[str, torch.Tensor] = {}
            for members, size in _pack(wanted, piece_bytes):
                piece = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
                read.pieces.append(piece)
                raw = memoryview(piece.numpy())
                run: list[int] | None = None  # [buffer start, file start, buffer end] of a contiguous run
                for e, offset in members:
                    n = e.end - e.start
                    if run is not None and (offset != run[2] or e.start != run[1] + (run[2] - run[0])):
                        jobs.append((shard, run[1], raw[run[0]:run[2]]))
                        run = None
                    if run is None:
                        run = [offset, e.start, offset]
                    run[2] = offset + n
                    if offset % e.dtype.itemsize:
                        read.reasons["misaligned for its dtype"] += 1
                    else:
                        views[e.name] = piece[offset:offset + n].view(e.dtype).view(e.shape)
                if run is not None and run[2] > run[0]:
                    jobs.append((shard, run[1], raw[run[0]:run[2]]))
                read.bytes += sum(e.end - e.start for e, _ in members)
            read.tensors[shard] = views
            read.file_ids[shard] = file_id
        for shard in files:
            handles[shard] = os.open(shard, os.O_RDONLY)

        def run(job: tuple[str, int, memoryview]) -> None:
            if stop is not None and stop.is_set():
                raise RuntimeError("layer read stopped")
            shard, offset, view = job
            _pread_into(handles[shard], view, offset)

        if readers is not None and len(jobs) > 1:
            for f in [readers.submit(run, j) for j in jobs]:
                f.result()
        else:
            for job in jobs:
                run(job)
        for shard in files:  # a file replaced or rewritten while it was read: none of it is served
            if _file_id(shard) != read.file_ids[shard]:
                read.tensors[shard] = {}
                read.reasons["file changed while read"] += 1
    finally:
        for fd in handles.values():
            os.close(fd)
    read.seconds = time.perf_counter() - t0
    return read


#: A tensor's buffer offset equals its file offset modulo this (so it fits its dtype where the file's does).
_ALIGN = 64


def _pack(entries: list[_Entry], piece_bytes: int) -> list[tuple[list[tuple[_Entry, int]], int]]:
    """``entries`` (file order) in pieces of about ``piece_bytes`` (a larger tensor: a piece of its
    own): each with its buffer offset, congruent to its file offset modulo :data:`_ALIGN`."""
    pieces: list[tuple[list[tuple[_Entry, int]], int]] = []
    members: list[tuple[_Entry, int]] = []
    used = 0
    for e in entries:
        n = e.end - e.start
        if members and used + n > piece_bytes:
            pieces.append((members, used))
            members, used = [], 0
        follows = members and members[-1][0].end == e.start
        offset = used if follows else used + (e.start - used) % _ALIGN
        members.append((e, offset))
        used = offset + n
    if members:
        pieces.append((members, used))
    return pieces


_INDEX = re.compile(r"^(.*\.)(\d+)$")


def exact_device(device: Any) -> torch.device | None:
    """``device`` as a ``torch.device`` with its index (``cuda`` -> ``cuda:<current>``); None if it is none."""
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError):
        return None
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def layer_index(path: str) -> int | None:
    """``model.layers.3`` -> 3 (None: no trailing index)."""
    m = _INDEX.match(path)
    return int(m.group(2)) if m else None


def first_layer_path(model: nn.Module, holds_experts: Callable[[nn.Module], bool]) -> str | None:
    """The path of the first entry of a ``ModuleList`` in ``model`` that holds our experts (the first decoder layer
    a run loads them with: ``model.layers.0``, or a later index where the first layers are dense), else None."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for index, child in enumerate(module):
                if holds_experts(child):
                    return f"{name}.{index}" if name else str(index)
    return None


def _next_path(path: str) -> str | None:
    """``model.layers.3`` -> ``model.layers.4`` (None: no trailing index)."""
    m = _INDEX.match(path)
    return f"{m.group(1)}{int(m.group(2)) + 1}" if m else None


class LayerReads:
    """The patched ``LazyTurtle._copy_checkpoint_tensors_into_submodule`` and ``structure.safe_open``
    of one lean block (see the module docstring). ``holds_experts(module)``: a layer this part serves."""

    def __init__(self, model: nn.Module, holds_experts: Callable[[nn.Module], bool], stats: LayerReadStats,
                 *, pin: bool = PIN, readers: int = READERS, piece_bytes: int = PIECE_BYTES,
                 max_bytes: int = MAX_LAYER_BYTES):
        self.model = model
        self.holds_experts = holds_experts
        self.stats = stats
        self.pin = pin
        self.piece_bytes = piece_bytes
        self.max_bytes = max_bytes
        self.active = serves_here()  # else every load is GPTQModel's own and nothing is read
        self.lock = threading.Lock()
        self.local = threading.local()  # .read: the _Read a load on this thread is served from
        self.readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="defuser-quant-read")
        self.ahead_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="defuser-quant-read-ahead")
        self.ahead: tuple[str, Future] | None = None  # (module path, its read)
        self.ahead_device: torch.device | None = None  # the device of the load that started the read ahead
        self.stop = threading.Event()  # set on close: reads not yet started give up
        self.closed = False

    # ----- what a layer's read holds
    def _files(self, turtle: Any, module_path: str) -> dict[str, list[str]] | None:
        """Shard path -> checkpoint names under ``module_path`` (None: nothing, or too large)."""
        weight_map = getattr(turtle, "_weight_map", None)
        root = getattr(turtle, "model_local_path", None)
        if not isinstance(weight_map, dict) or not isinstance(root, str):
            return None
        try:
            resolved = turtle._resolve_checkpoint_module_path(module_path)
        except Exception:  # GPTQModel's own lookup will say what is wrong, during its load
            return None
        if not isinstance(resolved, str) or not resolved:
            return None
        prefix = resolved + "."
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if name.startswith(prefix):
                files.setdefault(os.path.join(root, shard), []).append(name)
        if not files:
            return None
        try:
            total = sum(e.end - e.start for shard, names in files.items()
                        for e in (_header(shard).get(n) for n in names) if e is not None)
        except (OSError, ValueError, KeyError, struct.error):
            return None
        return files if total <= self.max_bytes else None

    def _read(self, files: dict[str, list[str]]) -> _Read:
        return read_tensors(files, pin=self.pin, readers=self.readers, piece_bytes=self.piece_bytes, stop=self.stop)

    def _take(self, turtle: Any, module_path: str) -> _Read | None:
        """The read for ``module_path``: the one read ahead (waited for), else read now."""
        with self.lock:
            ahead, self.ahead = self.ahead, None
        if ahead is not None:
            path, future = ahead
            if path == module_path:
                t0 = time.perf_counter()
                try:
                    read = future.result()
                except Exception as exc:  # noqa: BLE001 - the load reads the file itself and raises what stock raises
                    logger.warning("reading %s ahead failed (%s); GPTQModel reads it itself", module_path, exc)
                    self._count(failed=1)
                    return None
                self._count(waited_seconds=time.perf_counter() - t0, read_ahead=1)
                return read
            self._drop(future)
        files = self._files(turtle, module_path)
        if files is None:
            return None
        try:
            read = self._read(files)
        except Exception as exc:  # noqa: BLE001 - as above
            logger.warning("reading %s into host buffers failed (%s); GPTQModel reads it itself", module_path, exc)
            self._count(failed=1)
            return None
        self._count(waited_seconds=read.seconds)
        return read

    def read_first(self, turtle: Any) -> str | None:
        """Start reading the model's first layer that holds our experts ahead (the layer a run loads first, when that
        load comes straight to the device: ``capture_lazy``); its path, or None when nothing was started."""
        if self.closed or not self.active:
            return None
        path = first_layer_path(self.model, self.holds_experts)
        return path if path is not None and self._start_read(turtle, path) else None

    def _read_ahead(self, turtle: Any, module_path: str, device: torch.device | None = None) -> None:
        path = _next_path(module_path)
        if path is not None:
            self._start_read(turtle, path, device)

    def _start_read(self, turtle: Any, path: str, device: torch.device | None = None) -> bool:
        """Read the layer at ``path`` in the background, unless another read ahead is pending (whether it started);
        ``device``: where the load before it went (where ``layer_stage`` may copy it)."""
        try:
            layer = self.model.get_submodule(path)
        except AttributeError:
            return False
        if not self.holds_experts(layer):
            return False
        files = self._files(turtle, path)
        if files is None:
            return False
        with self.lock:
            if self.closed or self.ahead is not None:
                return False
            self.ahead = (path, self.ahead_pool.submit(self._read, files))
            self.ahead_device = device
        return True

    def _serve_staged(self, read: _Read, device: torch.device | None) -> None:
        """Serve ``read``'s device copies to a load onto ``device`` when they are there (``layer_stage``); the
        allocator keeps them until the load's stream has used them."""
        if read.staged is None or device is None or read.staged_device != device:
            return
        read.use_staged = True
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            for piece in read.staged_pieces:
                piece.record_stream(stream)
        self._count(staged_loads=1)

    def _drop_ahead_of(self, module_path: str) -> None:
        """A load of ``module_path`` that is not served: its read ahead will not be used; drop it now (so the next
        layer's read can start after this load)."""
        with self.lock:
            ahead = self.ahead if self.ahead is not None and self.ahead[0] == module_path else None
            if ahead is not None:
                self.ahead = None
        if ahead is not None:
            self._drop(ahead[1])

    def _drop(self, future: Future) -> None:
        future.cancel()
        self._count(unused=1)

    def _count(self, **add: float) -> None:
        with self.lock:
            for key, value in add.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

    def _finish(self, read: _Read) -> None:
        with self.lock:
            self.stats.layers += 1
            self.stats.bytes += read.bytes
            self.stats.read_seconds += read.seconds
            self.stats.tensors_served += len(read.served)
            for reason, n in read.reasons.items():
                self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + n

    # ----- the patches
    def patch_copy(self, original: Callable) -> Callable:
        reads = self

        @functools.wraps(original)
        def _copy_checkpoint_tensors_into_submodule(self, *, target_model, target_submodule, module_path, device,
                                                    recurse, non_blocking, modules_by_name=None, show_progress=True):
            def load():
                return original(self, target_model=target_model, target_submodule=target_submodule,
                                module_path=module_path, device=device, recurse=recurse, non_blocking=non_blocking,
                                modules_by_name=modules_by_name, show_progress=show_progress)

            if not whole_layer_load(reads.model, reads.holds_experts, target_model=target_model,
                                    target_submodule=target_submodule, module_path=module_path, recurse=recurse):
                return load()
            if reads.closed or not reads.active:
                reads._count(stock=1)
                return load()
            load_device = exact_device(device)
            serve = load_device is not None and load_device.type in SERVED_DEVICES
            if not serve:
                reads._drop_ahead_of(module_path)
            read = reads._take(self, module_path) if serve else None
            if read is None:
                reads._count(stock=1)
                loaded = load()
            else:
                reads._serve_staged(read, load_device)
                reads.local.read = read
                try:
                    loaded = load()
                finally:
                    reads.local.read = None
                    reads._finish(read)
                    del read  # its buffers go back to PyTorch's pinned cache once their copies are done
            reads._read_ahead(self, module_path, load_device)
            return loaded

        return _copy_checkpoint_tensors_into_submodule

    def patch_open(self, original: Callable) -> Callable:
        """``safe_open`` that serves the names read for the load running on this thread."""
        reads = self

        @functools.wraps(original)
        def safe_open(*args, **kwargs):
            read = getattr(reads.local, "read", None)
            if (read is not None and len(args) == 1 and isinstance(args[0], str)
                    and kwargs == {"framework": "pt", "device": "cpu"} and args[0] in read.tensors):
                shard = args[0]

                def serve(name: str) -> tuple[bool, Any]:
                    served, tensor = read.take(shard, name)
                    if not served:
                        reads._count(tensors_stock=1)
                    return served, tensor

                return DelegatingShard(original, shard, serve)
            return original(*args, **kwargs)

        return safe_open

    def close(self) -> None:
        """Stop reading ahead and wait for the reader threads (an unused read is dropped)."""
        with self.lock:
            self.closed = True
            ahead, self.ahead = self.ahead, None
        self.stop.set()
        if ahead is not None:
            self._drop(ahead[1])
        self.ahead_pool.shutdown(wait=True, cancel_futures=True)
        self.readers.shutdown(wait=True, cancel_futures=True)
