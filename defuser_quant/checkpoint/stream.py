"""Streaming safetensors writer: shards laid out from the plan, written tensor by tensor.

Every output tensor's name, dtype and shape is known before any data is read, so each shard's
header is written first and the data streamed after it; nothing larger than one expert slab is
ever held in memory. The file format is safetensors' (8-byte little-endian header length, JSON
header padded to 8 bytes, raw row-major data).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import CheckpointError
from .ops import SlabCache
from .plan import PlannedTensor
from .source import INDEX_NAME, SINGLE_NAME, SourceReader, write_all

logger = logging.getLogger(__name__)

_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}

def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` (10^9) or ``"500MiB"`` (2^20)."""
    if isinstance(size, int):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number):]
        if unit not in _UNITS or not number:
            raise CheckpointError(f"cannot read the size {size!r}; write e.g. 5GB, 500MB or 2GiB")
        value = int(float(number) * _UNITS[unit])
    if value <= 0:
        raise CheckpointError(f"the maximum shard size must be positive, got {size!r}")
    return value

def layout_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_size`` bytes of data
    (a single larger tensor gets a shard of its own), as ``save_pretrained`` does."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards if shards[0] else []

def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]

def header_bytes(tensors: list[PlannedTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The length-prefixed, space-padded JSON header of a shard holding ``tensors`` in order
    (anything with ``name``, ``dtype``, ``shape`` and ``nbytes``); ``metadata`` default ``{"format": "pt"}``."""
    header: dict[str, object] = {"__metadata__": dict(metadata) if metadata is not None else {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text

def write_shard(
    path: Path,
    tensors: list[PlannedTensor],
    reader: SourceReader,
    cache: SlabCache,
    on_tensor: Callable[[PlannedTensor], None] | None = None,
    fsync: bool = True,
) -> None:
    """Write one shard: header, then each tensor's bytes in order."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, header_bytes(tensors))
        for tensor in tensors:
            written = tensor.op.write_to(fd, reader, cache)
            if written != tensor.nbytes:
                raise CheckpointError(f"{tensor.name}: wrote {written} bytes, expected {tensor.nbytes}")
            if on_tensor is not None:
                on_tensor(tensor)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)

class _Stopped(Exception):
    """Another shard failed: stop this one at the next tensor boundary."""

def write_shards(
    folder: Path,
    shards: list[list[PlannedTensor]],
    names: list[str],
    root: Path,
    on_tensor: Callable[[PlannedTensor], None] | None = None,
    fsync: bool = True,
    workers: int = 2,
) -> None:
    """Write every shard, up to ``workers`` at a time, each with its own reader.

    Copying is bound by memory bandwidth and page-cache work that ``write`` does with the GIL
    released, so two shards in flight use both cores. The first failure stops the others at
    their next tensor and is raised.
    """
    stop = threading.Event()
    lock = threading.Lock()

    def guarded(tensor: PlannedTensor) -> None:
        if stop.is_set():
            raise _Stopped
        if on_tensor is not None:
            with lock:
                on_tensor(tensor)

    def one(shard: list[PlannedTensor], name: str) -> None:
        if stop.is_set():
            raise _Stopped
        with SourceReader(root) as reader:
            write_shard(folder / name, shard, reader, SlabCache(), guarded, fsync=fsync)

    if workers <= 1 or len(shards) <= 1:
        for shard, name in zip(shards, names):
            one(shard, name)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert") as pool:
        futures = [pool.submit(one, shard, name) for shard, name in zip(shards, names)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise

def write_index(folder: Path, shards: list[list[PlannedTensor]], names: list[str]) -> None:
    """``model.safetensors.index.json`` for a sharded output (none for a single file)."""
    if len(shards) <= 1:
        return
    weight_map = {t.name: name for shard, name in zip(shards, names) for t in shard}
    metadata = {
        "total_parameters": sum(t.numel for shard in shards for t in shard),
        "total_size": sum(t.nbytes for shard in shards for t in shard),
    }
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

def verify_output(folder: Path, shards: list[list[PlannedTensor]], names: list[str]) -> int:
    """Re-read every written header: names, dtypes, shapes, file sizes and the index must match
    the plan. Returns the number of tensors checked; raises ``CheckpointError`` otherwise."""
    from safetensors import safe_open

    checked = 0
    for shard, name in zip(shards, names):
        path = folder / name
        expected = {t.name: t for t in shard}
        header = header_bytes(shard)
        if path.stat().st_size != len(header) + sum(t.nbytes for t in shard):
            raise CheckpointError(f"{name}: size {path.stat().st_size} differs from its header")
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            if keys != set(expected):
                diff = sorted(keys ^ set(expected))
                raise CheckpointError(f"{name}: tensors differ from the plan ({len(diff)} names, e.g. {diff[0]})")
            for key in keys:
                piece = handle.get_slice(key)
                t = expected[key]
                if piece.get_dtype() != t.dtype or tuple(piece.get_shape()) != t.shape:
                    raise CheckpointError(
                        f"{name}: {key} is {piece.get_dtype()}{piece.get_shape()}, expected {t.dtype}{list(t.shape)}"
                    )
                checked += 1
    if len(shards) > 1:
        index = json.loads((folder / INDEX_NAME).read_text())
        planned = {t.name: n for shard, n in zip(shards, names) for t in shard}
        if index.get("weight_map") != planned:
            raise CheckpointError(f"{INDEX_NAME} does not match the written shards")
    return checked
