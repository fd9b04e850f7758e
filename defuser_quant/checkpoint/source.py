"""A safetensors checkpoint on disk: its shards, tensor headers, and memory-mapped reads.

Only headers are read to plan a conversion. Tensor data is read through ``safe_open``
(memory-mapped); the handles are closed every few hundred MiB so pages already copied out do
not pile up in the resident set of the process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .meta import read_json

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Bytes per element of every safetensors dtype the converter may meet.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of one stored tensor."""

    name: str
    file: str  # shard file name, relative to the checkpoint directory
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        if self.dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{self.name}: unsupported safetensors dtype {self.dtype}")
        return self.numel * DTYPE_SIZES[self.dtype]


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


def read_headers(root: Path, files: list[str]) -> dict[str, TensorInfo]:
    """Every tensor's header facts, in shard order; raises on duplicate names."""
    from safetensors import safe_open

    infos: dict[str, TensorInfo] = {}
    for file in files:
        with safe_open(str(root / file), framework="pt") as handle:
            for name in handle.keys():
                if name in infos:
                    raise CheckpointError(f"tensor {name} is stored twice ({infos[name].file} and {file})")
                piece = handle.get_slice(name)
                infos[name] = TensorInfo(name, file, piece.get_dtype(), tuple(piece.get_shape()))
    return infos


class SourceReader:
    """Reads tensors (or one expert's slab of a fused tensor) from memory-mapped shards."""

    def __init__(self, root: Path, release_every: int = 256 << 20):
        self.root = root
        self.release_every = release_every
        self._handles: dict[str, object] = {}
        self._since_release = 0

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
            self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
        self._since_release = 0

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
