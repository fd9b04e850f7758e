"""Fewer, larger device-to-host copies when transformers writes a GPU-resident checkpoint.

``save_pretrained`` hands each shard to safetensors' ``save_file``, which copies every tensor
that is not on the CPU with its own blocking ``.to("cpu")``. A compressed MoE checkpoint has
thousands of small tensors (packed weights, scales, shapes of every expert projection): on an
H200, two Qwen3-30B-A3B-shape layers (2,341 tensors) spent ~1.6 s of a ~3 s save in those copies.

:func:`staged_shard_writes` wraps transformers' ``safe_save_file`` so the tensors of a shard that
sit on an accelerator are first brought to the CPU in chunks: the tensors of a chunk
(at most :data:`CHUNK_BYTES`, whole tensors) are concatenated as bytes on their device, copied
once, and split back into one CPU tensor each (its own storage, the same dtype, shape and
bytes). safetensors then writes exactly the file it would have written. Tensors it cannot stage
(not contiguous, not strided, meta) are passed on unchanged, as is everything when transformers
no longer has ``modeling_utils.safe_save_file``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

__all__ = ["CHUNK_BYTES", "host_copies", "staged_shard_writes"]

logger = logging.getLogger(__name__)

#: Largest concatenation (bytes) copied to the host at once; larger tensors are copied alone.
CHUNK_BYTES = 256 * 2**20


def _stageable(t: object) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.device.type not in ("cpu", "meta")
        and t.layout == torch.strided
        and t.is_contiguous()
        and t.numel() > 0
    )


def _copy_chunk(items: list[tuple[str, torch.Tensor]], out: dict[str, torch.Tensor]) -> None:
    """One device-to-host copy of the bytes of ``items``, split into one CPU tensor each."""
    if len(items) == 1:
        name, t = items[0]
        out[name] = t.cpu()
        return
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in items]).cpu()
    offset = 0
    for name, t in items:
        size = t.numel() * t.element_size()
        # clone: a storage of its own (aligned for the dtype view, and not shared with the others)
        out[name] = flat[offset:offset + size].clone().view(t.dtype).view(t.shape)
        offset += size


def host_copies(tensors: Mapping[str, object], chunk_bytes: int = CHUNK_BYTES) -> dict[str, object]:
    """``tensors`` with every contiguous accelerator tensor replaced by a CPU copy (same bytes),
    many small ones per device-to-host copy; everything else as it is."""
    out = dict(tensors)
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if _stageable(t):
            by_device.setdefault(t.device, []).append((name, t))
    for items in by_device.values():
        chunk: list[tuple[str, torch.Tensor]] = []
        size = 0
        for item in [*items, None]:
            n = 0 if item is None else item[1].numel() * item[1].element_size()
            if chunk and (item is None or size + n > chunk_bytes):
                _copy_chunk(chunk, out)
                chunk, size = [], 0
            if item is not None:
                chunk.append(item)
                size += n
    return out


@contextmanager
def staged_shard_writes() -> Iterator[bool]:
    """Inside the block, transformers' shard writes stage accelerator tensors through :func:`host_copies`;
    yields whether the write function was found (False: nothing changed)."""
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_save_file", None)
    if original is None or getattr(original, "_defuser_quant_staged", False):
        if original is None:
            logger.debug("transformers.modeling_utils.safe_save_file not found: shards are written unstaged")
        yield original is not None
        return

    @functools.wraps(original)
    def save_file(tensors, filename, *args, **kwargs):
        return original(host_copies(tensors), filename, *args, **kwargs)

    save_file._defuser_quant_staged = True
    modeling_utils.safe_save_file = save_file
    try:
        yield True
    finally:
        modeling_utils.safe_save_file = original
