"""GPTQModel's save writes each safetensors shard with fewer copies, whole or not at all.

GPTQModel 7.6's ``_write_shard_file`` copies every in-memory tensor into a ``bytes`` object
(``numpy().tobytes()``) before writing it, and copies every disk-offloaded tensor through a
32 MiB Python buffer under a process-wide lock. :func:`write_shard_file` writes the same file,
byte for byte (GPTQModel's header, tensors in the same order):

* an in-memory CPU tensor is written from its own memory (``os.write`` of a view, no copy);
* an offloaded tensor with a byte range (GPTQModel's ``.dat`` files and safetensors bundles,
  ours included) is copied file to file by the kernel (``copy_file_range``);
* anything else (an offloaded tensor without a byte range) is read the way GPTQModel reads it.

With ``threads`` above one the same bytes go through a shared mapping of the file, several threads
copying at once (:mod:`.mapped_shard`; opt-in, ``install(write_threads=...)``).

The shard is written under a temporary name next to it and renamed into place once whole; an
error or Ctrl-C removes the temporary file, so a shard that exists is whole, and an earlier file
of the same name is left as it was. A tensor whose bytes do not match its header entry is refused.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from defuser_quant.checkpoint.source import copy_range, write_all

from . import mapped_shard
from .compat import source_digest

__all__ = ["WRITE_SHARD_DIGEST", "ShardWrites", "fast_shard_writes", "write_shard_file", "writer_mismatch"]

logger = logging.getLogger(__name__)

#: sha256[:16] of GPTQModel 7.6.0's ``utils.model._write_shard_file``, whose file this writer writes
WRITE_SHARD_DIGEST = "55eb917b07f079e8"


@dataclass
class ShardWrites:
    """Bytes :func:`write_shard_file` wrote, by how: from memory, copied file to file, read first."""

    files: int = 0
    from_memory: int = 0
    copied: int = 0
    read: int = 0
    mapped: int = 0  # files written through a shared mapping by several threads


def writer_mismatch() -> str | None:
    """Why :func:`write_shard_file` may not stand in for the installed GPTQModel's writer (None: it may)."""
    from gptqmodel.utils import model as model_utils

    original = getattr(model_utils, "_write_shard_file", None)
    if original is None or getattr(model_utils, "OffloadTensorRef", None) is None:
        return "gptqmodel.utils.model._write_shard_file or OffloadTensorRef is missing"
    if source_digest(getattr(original, "__defuser_quant_original__", original)) != WRITE_SHARD_DIGEST:
        return "gptqmodel.utils.model._write_shard_file differs from GPTQModel 7.6.0's (the file format it writes is unchecked)"
    if "_write_shard_file" not in getattr(model_utils.streaming_state_dict_to_shards, "__code__", compile("", "", "exec")).co_names:
        return "streaming_state_dict_to_shards no longer calls _write_shard_file"
    return None


def _header(entries: list[Any], metadata: dict[str, str], dtype_name: Callable[[torch.dtype], str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": dtype_name(entry.torch_dtype), "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.num_bytes]}
        offset += entry.num_bytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)  # safetensors pads its header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(name: str, tensor: torch.Tensor, nbytes: int) -> torch.Tensor:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    if flat.numel() != nbytes:
        raise ValueError(f"save: tensor {name} holds {flat.numel()} bytes, its header entry says {nbytes}; not written")
    return flat


class _Sources:
    """Source files opened once per shard write."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _write_entry(fd: int, entry: Any, sources: _Sources, ref_type: type, stats: ShardWrites) -> None:
    source = entry.source
    if not isinstance(source, ref_type):
        write_all(fd, _tensor_array(entry))
        stats.from_memory += entry.num_bytes
    elif (start := _ranged(source, entry)) is not None:
        copy_range(sources.fd(source.path), fd, start, entry.num_bytes)
        stats.copied += entry.num_bytes
    else:
        write_all(fd, _read_offloaded(entry).numpy())
        stats.read += entry.num_bytes


def _ranged(source: Any, entry: Any) -> int | None:
    """Where an offloaded tensor's bytes start in its file (None: it has no byte range and is read first)."""
    if not (source.format == "dat" or (source.format == "safetensors" and source.data_offsets is not None)):
        return None
    start = source.data_offsets[0] if source.data_offsets is not None else 0
    if source.format == "safetensors" and source.data_offsets[1] - start != entry.num_bytes:
        raise ValueError(f"save: offloaded tensor {entry.name} spans {source.data_offsets[1] - start} bytes in "
                         f"{source.path}, its header entry says {entry.num_bytes}; not written")
    return start


def _read_offloaded(entry: Any) -> torch.Tensor:
    """An offloaded tensor without a byte range, read the way GPTQModel reads it."""
    from safetensors import safe_open

    source = entry.source
    with safe_open(source.path, framework="pt", device="cpu") as handler:
        tensor = handler.get_tensor(source.weight_name or entry.name).to(source.torch_dtype)
    return _tensor_bytes(entry.name, tensor, entry.num_bytes)


def _read_offloaded_array(entry: Any) -> Any:
    return _read_offloaded(entry).numpy()


def _tensor_array(entry: Any) -> Any:
    return _tensor_bytes(entry.name, entry.source, entry.num_bytes).numpy()


def _planned(header: bytes, entries: list[Any], sources: _Sources, ref_type: type, stats: ShardWrites
             ) -> list[mapped_shard.Piece]:
    """Every entry's bytes as pieces at their offsets in the shard (contiguous CPU tensors and byte ranges checked
    against their header entries here, the rest when copied)."""
    parts: list[mapped_shard.Piece] = []
    offset = len(header)
    for entry in entries:
        source = entry.source
        if not isinstance(source, ref_type) and source.device.type == "cpu" and source.is_contiguous():
            parts += mapped_shard.pieces(offset, entry.num_bytes, _tensor_array(entry))
            stats.from_memory += entry.num_bytes
        elif not isinstance(source, ref_type):  # its contiguous CPU copy made (and checked) when copied, not all at once
            parts.append(mapped_shard.Piece(offset, entry.num_bytes, read=functools.partial(_tensor_array, entry)))
            stats.from_memory += entry.num_bytes
        elif (start := _ranged(source, entry)) is not None:
            parts += mapped_shard.pieces(offset, entry.num_bytes, file=(sources.fd(source.path), start))
            stats.copied += entry.num_bytes
        else:
            parts.append(mapped_shard.Piece(offset, entry.num_bytes, read=functools.partial(_read_offloaded_array, entry)))
            stats.read += entry.num_bytes
        offset += entry.num_bytes
    return parts


def write_shard_file(path: str, entries: list[Any], metadata: dict[str, str], stats: ShardWrites | None = None,
                     threads: int = 1) -> int:
    """Write one shard of GPTQModel's save (same arguments and bytes as its ``_write_shard_file``);
    returns the file's size. ``stats``, when given, counts the bytes by how they were written. With ``threads``
    above one the bytes are copied into a shared mapping of the file by that many threads (where the file system
    cannot reserve or map the file, written in order)."""
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"write_shard_file: threads must be a whole number >= 1, got {threads!r}")
    stats = stats if stats is not None else ShardWrites()
    from gptqmodel.utils import model as model_utils

    header = _header(entries, metadata, model_utils._torch_dtype_to_safetensors)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.partial-{os.getpid()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)  # the mode open(path, "wb") gives
    sources = _Sources()
    try:
        counted, size = ShardWrites(), None
        if threads > 1:
            parts = _planned(header, entries, sources, model_utils.OffloadTensorRef, counted)
            size = mapped_shard.fill_mapped(fd, header, parts, threads)
            counted.mapped = int(size is not None)
        if size is None:
            counted = ShardWrites()  # the planning's counts dropped: the writes in order count their own
            write_all(fd, header)
            for entry in entries:
                _write_entry(fd, entry, sources, model_utils.OffloadTensorRef, counted)
            size = os.lseek(fd, 0, os.SEEK_CUR)
        for counter in fields(ShardWrites):  # counted.files stays 0: the file is counted below
            setattr(stats, counter.name, getattr(stats, counter.name) + getattr(counted, counter.name))
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        stats.files += 1
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        sources.close()
    return size


def fast_shard_writes(original: Callable[..., int], stats: Callable[[], ShardWrites | None] = lambda: None,
                      threads: Callable[[], int] = lambda: 1) -> Callable[..., int]:
    """``original`` (GPTQModel's ``_write_shard_file``) replaced by :func:`write_shard_file` when the
    installed GPTQModel writes the file this writer was checked against; else ``original``, logged.
    ``stats()`` gives the counter each write adds to, ``threads()`` the threads each write copies with."""
    why = writer_mismatch()
    if why is not None:
        logger.info("save: GPTQModel's own shard writer kept: %s", why)
        return original

    @functools.wraps(original)
    def _write_shard_file(path: str, entries: list[Any], metadata: dict[str, str]) -> int:
        return write_shard_file(path, entries, metadata, stats(), threads())

    _write_shard_file.__defuser_quant_original__ = original  # type: ignore[attr-defined]
    return _write_shard_file
