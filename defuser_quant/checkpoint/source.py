"""A safetensors checkpoint on disk: its shards, tensor headers, and reads.

Only headers are read to plan a conversion; each tensor's byte range in its shard comes from the
header too. Bytes that move unchanged are copied file to file by the kernel
(``copy_file_range``: no user-space buffer, nothing resident). Tensors that need rearranging
(interleaved or transposed layouts) are read through ``safe_open`` (memory-mapped); those maps
are closed every 64 MiB read so pages already copied out do not pile up in the resident set.
"""

from __future__ import annotations

import errno
import math
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .meta import read_json

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Bytes per element of every safetensors dtype the converter may meet.
def tensor_nbytes(name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a safetensors tensor; unknown dtypes are an error naming the tensor."""
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{name}: unsupported safetensors dtype {dtype}")
    return math.prod(shape) * DTYPE_SIZES[dtype]


DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


class SizedTensor:
    """``numel``/``nbytes`` of a tensor described by ``name``, ``dtype`` (safetensors) and ``shape``."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.name, self.dtype, self.shape)


@dataclass(frozen=True)
class TensorInfo(SizedTensor):
    """Header facts of one stored tensor."""

    name: str
    file: str  # shard file name, relative to the checkpoint directory
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int = 0  # absolute offset of the first data byte in the shard file


def shard_files(root: Path) -> list[str]:
    """Weight shard names of a checkpoint directory (from its index, else ``model.safetensors``)."""
    index = root / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {missing[:3]}")
        return files
    if (root / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    raise CheckpointError(f"{root} has neither {INDEX_NAME} nor {SINGLE_NAME}: only safetensors checkpoints are supported")


#: safetensors' own limit on a header's size
MAX_HEADER_BYTES = 100_000_000


def raw_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header JSON, offset of the data section) of a safetensors file; a header larger than
    safetensors allows is a ``ValueError``."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: a safetensors header of {size} bytes")
        return json.loads(f.read(size)), 8 + size


def read_headers(root: Path, files: list[str]) -> dict[str, TensorInfo]:
    """Every tensor's header facts, in shard order; raises on duplicate names or a bad header."""
    from safetensors import safe_open

    infos: dict[str, TensorInfo] = {}
    for file in files:
        path = root / file
        try:
            with safe_open(str(path), framework="pt"):
                pass  # safetensors validates the header (offsets contiguous, within the file)
            header, base = raw_header(path)
        except Exception as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if name in infos:
                raise CheckpointError(f"tensor {name} is stored twice ({infos[name].file} and {file})")
            start, end = entry["data_offsets"]
            info = TensorInfo(name, file, entry["dtype"], tuple(entry["shape"]), base + start)
            if end - start != info.nbytes:
                raise CheckpointError(f"{path}: {name} spans {end - start} bytes, its dtype and shape say {info.nbytes}")
            infos[name] = info
    return infos


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Append ``length`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` (kernel-side copy)."""
    while length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(length, 1 << 30), offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            n = _copy_via_buffer(src_fd, dst_fd, offset, min(length, 64 << 20))
        if n == 0:
            raise CheckpointError("unexpected end of a source shard")
        offset += n
        length -= n


def _copy_via_buffer(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    data = os.pread(src_fd, length, offset)
    write_all(dst_fd, data)
    return len(data)


def write_all(fd: int, data) -> None:
    """``os.write`` until every byte of ``data`` (any buffer) is written."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


class SourceReader:
    """Reads tensors (or one expert's slab of a fused tensor) from memory-mapped shards."""

    def __init__(self, root: Path, release_every: int = 64 << 20):
        self.root = root
        self.release_every = release_every
        self._handles: dict[str, object] = {}
        self._fds: dict[str, int] = {}
        self._since_release = 0

    def fd(self, file: str) -> int:
        """A read-only file descriptor of a shard (kept open until ``close``)."""
        if file not in self._fds:
            self._fds[file] = os.open(self.root / file, os.O_RDONLY)
        return self._fds[file]

    def _handle(self, file: str):
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.root / file), framework="pt")
            self._handles[file] = handle
        return handle

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        """The whole tensor (a view of the mapped file while the handle is open)."""
        self._since_release += info.nbytes
        return self._handle(info.file).get_tensor(info.name)

    def rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the first dimension."""
        self._since_release += info.nbytes // max(info.shape[0], 1) * (stop - start)
        return self._handle(info.file).get_slice(info.name)[start:stop]

    def maybe_release(self) -> None:
        """Close the shard maps once enough has been read since the last release."""
        if self._since_release >= self.release_every:
            self.release()

    def release(self) -> None:
        """Close the shard maps (file descriptors stay open)."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
        self._since_release = 0

    def close(self) -> None:
        self.release()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
