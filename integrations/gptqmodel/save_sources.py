"""At save, map the unquantized weights GPTQModel would re-read from the source checkpoint.

With disk offload on, GPTQModel 7.6's save first materializes every parameter still on the meta
device (for a Qwen3-MoE model: the embeddings and the output head) from the source checkpoint:
it reads each tensor into memory and clones it (``LazyTurtle.sync_all_meta``), then copies it
again into a ``bytes`` object to write it. For a parameter stored whole in the source checkpoint,
in the parameter's dtype and shape, with nothing to decode, slice or transpose, those bytes are
already on disk. :func:`map_whole_sources` gives each such parameter a view of its bytes in a
copy-on-write memory map of the source shard instead (``mmap.ACCESS_COPY``): nothing is read until
it is written out, the source file is never written (writes to the tensor go to private pages),
and ``sync_all_meta`` then materializes only what is left, as before.

Refused, so GPTQModel materializes as before: tied word embeddings; a parameter whose source is a
slice, a concatenation, another dtype or shape, or encoded; a tensor whose offset is not aligned
to its element size. The plugin maps only while its shard writer (``shard_writer``) writes the
save: that writer replaces a file by renaming a new one over it, so even a save into the source
checkpoint's own folder leaves the mapped (old) file's bytes in place until they are written.
"""

from __future__ import annotations

import functools
import logging
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defuser_quant.checkpoint.source import TensorInfo, read_headers
from defuser_quant.checkpoint.tensor_file import SAFETENSORS_DTYPES

from .compat import source_digest

__all__ = ["MATERIALIZE_DIGEST", "MappedSources", "map_whole_sources", "mapped_turtle_sources", "sources_mismatch"]

logger = logging.getLogger(__name__)

#: sha256[:16] of GPTQModel 7.6.0's ``LazyTurtle._materialize_direct_meta_tensors`` (skips what is not meta)
MATERIALIZE_DIGEST = "81a5100c73ec94a6"


@dataclass
class MappedSources:
    """What :func:`map_whole_sources` did in one save."""

    mapped: int = 0
    bytes: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def refuse(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1


def sources_mismatch() -> str | None:
    """Why the installed GPTQModel's lazy source may not be mapped (None: it may)."""
    from gptqmodel.utils import structure

    turtle = getattr(structure, "LazyTurtle", None)
    needed = ("_resolve_checkpoint_tensor_source", "_resolve_concat_checkpoint_tensor_sources",
              "_decode_mimo_checkpoint_tensor", "_transform_checkpoint_tensor", "sync_all_meta")
    if turtle is None or not all(hasattr(turtle, n) for n in needed):
        return "gptqmodel.utils.structure.LazyTurtle lacks " + ", ".join(n for n in needed if not hasattr(turtle, n))
    if source_digest(turtle._materialize_direct_meta_tensors) != MATERIALIZE_DIGEST:
        return "LazyTurtle._materialize_direct_meta_tensors differs from GPTQModel 7.6.0's"
    return None


class _Shards:
    """Header facts and one private map per source shard."""

    def __init__(self, root: Path):
        self.root = root
        self.infos: dict[str, dict[str, TensorInfo]] = {}
        self.maps: dict[str, mmap.mmap] = {}

    def info(self, shard: str, name: str) -> TensorInfo | None:
        """``name``'s header facts in ``shard``; None when the shard's header cannot be read (GPTQModel then
        reads the tensor its own way and reports what is wrong with the file)."""
        if shard not in self.infos:
            try:
                self.infos[shard] = read_headers(self.root, [shard])
            except Exception as exc:
                logger.info("save: %s not mapped: %s", shard, exc)
                self.infos[shard] = {}
        return self.infos[shard].get(name)

    def tensor(self, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
        if not info.nbytes:
            return torch.empty(info.shape, dtype=dtype)
        if info.file not in self.maps:
            with open(self.root / info.file, "rb") as f:
                self.maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        # a storage of its own per tensor (GPTQModel's save drops tensors that share one as tied)
        data = torch.frombuffer(self.maps[info.file], dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        return data.view(dtype).view(info.shape)


def _whole_source(turtle: Any, path: str, name: str, param: torch.Tensor, sub: nn.Module, shards: _Shards,
                  stats: MappedSources) -> TensorInfo | None:
    if turtle._resolve_concat_checkpoint_tensor_sources(path, name) is not None:
        return stats.refuse("concatenated from several tensors")
    full, expert, split, split_dim = turtle._resolve_checkpoint_tensor_source(path, name)
    shard = turtle._weight_map.get(full) if full is not None else None
    if shard is None:
        return stats.refuse("no tensor of the source checkpoint")
    if expert is not None or split is not None or split_dim is not None:
        return stats.refuse("a slice of a source tensor")
    info = shards.info(shard, full)
    if info is None:
        return stats.refuse("not in its shard's readable header")
    if info.dtype != SAFETENSORS_DTYPES.get(param.dtype) or info.shape != tuple(param.shape):
        return stats.refuse("another dtype or shape in the source")
    if info.offset % param.element_size():
        return stats.refuse("not aligned in the source shard")
    probe = torch.empty(info.shape, dtype=param.dtype, device="meta")
    try:
        decoded = turtle._decode_mimo_checkpoint_tensor(full, probe, target_dtype=param.dtype)
        shaped = turtle._transform_checkpoint_tensor(probe, expert_index=None, split_index=None, split_dim=None,
                                                     expected_shape=info.shape,
                                                     prefer_transposed=getattr(sub, "is_transposed", None))
    except Exception:  # a decoder that cannot run on the meta device decodes something: leave it to GPTQModel
        return stats.refuse("decoded or reshaped at load")
    if decoded is not probe or shaped is not probe:
        return stats.refuse("decoded or reshaped at load")
    return info


def map_whole_sources(shell_model: nn.Module, turtle: Any, *, skip_module_types: tuple[type, ...] = ()) -> MappedSources:
    """Give each meta parameter of ``shell_model`` stored whole in ``turtle``'s checkpoint a private
    map of its source bytes (see the module docstring). The same source tensor gets one parameter."""
    stats = MappedSources()
    root = Path(turtle.model_local_path)
    if getattr(getattr(shell_model, "config", None), "tie_word_embeddings", False):
        stats.refuse("tied word embeddings")
        return stats
    shards = _Shards(root)
    made: dict[str, nn.Parameter] = {}
    todo: list[tuple[nn.Module, str, nn.Parameter]] = []
    for path, sub in shell_model.named_modules():
        if isinstance(sub, skip_module_types):
            continue
        for name, param in sub.named_parameters(recurse=False):
            if param.device.type != "meta":
                continue
            info = _whole_source(turtle, path, name, param, sub, shards, stats)
            if info is None:
                continue
            key = f"{info.file}:{info.name}:{param.dtype}:{param.requires_grad}"
            if key not in made:
                made[key] = nn.Parameter(shards.tensor(info, param.dtype), requires_grad=param.requires_grad)
                stats.bytes += info.nbytes
            todo.append((sub, name, made[key]))
    for sub, name, mapped in todo:  # nothing changes until every source has been checked
        sub.register_parameter(name, mapped)
    stats.mapped = len(todo)
    if todo:
        logger.info("save: %d parameter(s) (%.1f MiB) mapped from the source checkpoint instead of read and copied",
                    len(todo), stats.bytes / 2**20)
    return stats


def mapped_turtle_sources(original: Callable[..., int],
                          record: Callable[[MappedSources], None] | None = None) -> Callable[..., int]:
    """``original`` (GPTQModel's ``alias_all_from_turtle_if_meta`` as the writer calls it) preceded by
    :func:`map_whole_sources`; ``original`` alone when the installed GPTQModel differs (logged)."""
    why = sources_mismatch()
    if why is not None:
        logger.info("save: GPTQModel materializes every meta parameter itself: %s", why)
        return original

    @functools.wraps(original)
    def alias_all_from_turtle_if_meta(shell_model: nn.Module, turtle_model: Any, *args: Any, **kwargs: Any) -> int:
        stats = MappedSources()
        if turtle_model is not None:
            stats = map_whole_sources(shell_model, turtle_model, skip_module_types=kwargs.get("skip_module_types", ()))
        if record is not None:
            record(stats)
        return original(shell_model, turtle_model, *args, **kwargs)

    alias_all_from_turtle_if_meta.__defuser_quant_original__ = original  # type: ignore[attr-defined]
    return alias_all_from_turtle_if_meta
