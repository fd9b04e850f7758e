"""Write in-memory torch tensors as one safetensors file, with Python's lock released while copying.

``safetensors.torch.save_file`` copies every tensor into a bytes object and writes the file
while holding Python's lock, so shards written from several threads take turns. Here each
tensor's bytes go from its own memory (after one device-to-host copy for a GPU tensor) straight
to ``os.write``; both the copy and the write release the lock, so threads overlap. A GPU
tensor is copied in pieces through a pinned buffer on a stream of the call's own. The file is a
standard safetensors file, byte for byte what ``save_file`` writes: the header written by
:func:`.stream.header_bytes`, tensors in safetensors' order (by dtype, wider first, then by name),
so every tensor's data starts aligned to its element size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .source import write_all
from .stream import header_bytes

__all__ = ["SAFETENSORS_DTYPES", "STAGING_BYTES", "writable", "write_safetensors"]

#: torch dtype -> safetensors dtype name
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
if hasattr(torch, "float8_e8m0fnu"):  # MX scales
    SAFETENSORS_DTYPES[torch.float8_e8m0fnu] = "F8_E8M0"


#: safetensors' own order of dtypes in a file (wider first, so every tensor's data stays aligned)
_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8",
          "U8", "BOOL")


def _unwritable(name: str, tensor: torch.Tensor) -> str | None:
    """Why :func:`write_safetensors` cannot write ``tensor`` (None: it can)."""
    if tensor.dtype not in SAFETENSORS_DTYPES:
        return f"{name}: dtype {tensor.dtype} has no safetensors name; save it with safetensors' own writer"
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        return f"{name}: a {tensor.layout} tensor on {tensor.device} has no bytes to write"
    return None


def writable(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether :func:`write_safetensors` can write every one of ``tensors`` (else use safetensors' own writer)."""
    return not any(_unwritable(name, t) for name, t in tensors.items())


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    tensor: torch.Tensor


def _entry(name: str, tensor: torch.Tensor) -> _Entry:
    why = _unwritable(name, tensor)
    if why is not None:
        raise TypeError(why)
    return _Entry(name, SAFETENSORS_DTYPES[tensor.dtype], tuple(tensor.shape), tensor.numel() * tensor.element_size(),
                  tensor)


#: bytes per device-to-host copy of a GPU tensor (through one pinned buffer per call)
STAGING_BYTES = 64 * 2**20


class _Staging:
    """A pinned host buffer and a stream of this call's own: GPU bytes are copied in pieces and
    written from there, so copies from several threads neither share a stream nor page-lock memory
    per tensor."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.buffer = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)

    def write(self, fd: int, flat: torch.Tensor) -> None:
        # ``flat`` may come from this thread's own ``contiguous()`` on the device's current stream
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for start in range(0, flat.numel(), STAGING_BYTES):
            piece = flat[start:start + STAGING_BYTES]
            host = self.buffer[: piece.numel()]
            with torch.cuda.stream(self.stream):
                host.copy_(piece, non_blocking=True)
            self.stream.synchronize()
            write_all(fd, host.numpy())


def write_safetensors(tensors: dict[str, torch.Tensor], filename: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``filename`` (safetensors; same call as ``safetensors.torch.save_file``).

    GPU tensors must be ready on their device (the caller synchronizes the stream that made them).
    """
    entries = sorted((_entry(n, t) for n, t in tensors.items()), key=lambda e: (_ORDER.index(e.dtype), e.name))
    staging: dict[torch.device, _Staging] = {}
    fd = os.open(Path(filename), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, header_bytes(entries, metadata))  # type: ignore[arg-type]
        for entry in entries:
            if not entry.nbytes:
                continue
            flat = entry.tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            if flat.device.type == "cuda":
                if flat.device not in staging:
                    staging[flat.device] = _Staging(flat.device)
                staging[flat.device].write(fd, flat)
            else:
                write_all(fd, flat.to("cpu").numpy())
    finally:
        os.close(fd)
