"""The save's packing of same-shape quantized Linears done in batches (compressed-tensors' pack-quantized format).

When llm-compressor saves a compressed model, compressed-tensors' ``ModelCompressor.compress_model`` packs
one module at a time: for each quantized Linear ``PackedQuantizationCompressor.compress`` quantizes the
weight with its scales, packs the integers into int32 words and swaps the module's parameters. A MoE
layer holds hundreds of expert projections of one shape and scheme; on a GPU each module's dozen small
kernels, Python calls and one host sync (``pack_to_int32``'s ``ov_mask.any()``) cost far more than the
arithmetic (round 46's profile: 0.8 s of host time for 776 modules, the GPU busy 5% of it).

Quantizing (group or channel strategy) and packing (along each row) treat every output row on its own,
with the scales of that row. So the rows of many modules stacked into one tensor, quantized and packed
by compressed-tensors' own ``quantize`` and ``pack_to_int32``, give each module's words bit for bit.
:func:`batched_compression` does that for groups of modules alike in everything the compression reads
(class, format, weight arguments, shapes, dtypes, device, parameter names), in chunks of at most
:data:`CHUNK_BYTES` of weights, then gives each module its own copy of its words and swaps its
parameters through compressed-tensors' own ``replace_direct_state_dict``, exactly as its ``compress`` would
(``weight_shape``, the zero point packed or dropped, ``quantization_status``, ``scheme.format``). Every
other module (another format or strategy, a global scale, a group of one, under ``torchrun``) is left to
compressed-tensors' loop, which runs right after and skips the modules done here.

Checked, not assumed: the first module of every chunk is also compressed by compressed-tensors' own
``compress`` and its words compared; a chunk that differs, or whose stacked packing raises (out of memory),
is dropped whole to the per-module loop before any of its modules is touched, with a warning, and its key is
not batched again.

On by default in ``DefuseModifier`` (``batched_compress``): on one H100 it packed 776 modules in 14 chunks in 0.19-0.22 s
against the loop's 0.54-0.90 s, every chunk's check passing and the checkpoint unchanged (round 47).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.compressors.pack_quantized.base import PACK_ZP_STRATS, PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.config import CompressionFormat
from compressed_tensors.offload import disable_onloading
from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils import is_module_quantized
from compressed_tensors.utils import get_direct_state_dict, replace_direct_state_dict
from torch import nn

__all__ = ["BATCHED_DEVICES", "CHUNK_BYTES", "CompressionBatching", "batched_compression", "compress_in_batches", "with_batched_compression"]

logger = logging.getLogger(__name__)

#: where the stacked packing runs: on a GPU it saves launches and syncs; on a CPU the stacked tensors leave the
#: caches and it took twice the per-module loop's time (64 projections of 768 x 2048, 2 cores)
BATCHED_DEVICES = frozenset({"cuda"})

#: the most weight bytes stacked at once (the stack, its integers and its int32 words live together briefly)
CHUNK_BYTES = 256 << 20

_PATCH_LOCK = threading.RLock()


@dataclass
class CompressionBatching:
    """What one save's batched packing did."""

    modules: int = 0  # modules packed here
    groups: int = 0  # groups of two or more alike modules
    chunks: int = 0
    checked: int = 0  # chunks whose first module was compared with compressed-tensors' own compress
    mismatched: int = 0  # chunks left to the per-module loop because that comparison failed
    left: dict[str, int] = field(default_factory=dict)  # modules left to compressed-tensors' loop, by reason

    def leave(self, reason: str, count: int = 1) -> None:
        self.left[reason] = self.left.get(reason, 0) + count

    def as_dict(self) -> dict[str, Any]:
        return {"modules": self.modules, "groups": self.groups, "chunks": self.chunks, "checked": self.checked,
                "mismatched": self.mismatched, "left": dict(self.left)}


def _format_of(module: nn.Module, scheme: Any, forced: Any) -> Any:
    """The format ``compress_module`` would pick, without setting it."""
    return CompressionFormat(forced or scheme.format or infer_module_format(type(module), scheme))


def _execution_device(module: nn.Module, weight: torch.Tensor) -> torch.device:
    """Where the module's tensors are onloaded to (compressed-tensors' offload cache), else where they are."""
    return torch.device(getattr(module._parameters, "onload_device", None) or weight.device)


class _Alike(NamedTuple):
    """Everything the packing reads, equal for the modules of one group."""

    module_class: type
    device: torch.device
    format: Any
    weight_args: str
    scheme: str
    tensors: tuple  # (name, shape, dtype, device) of each of the module's tensors
    names: tuple


def _key(module: nn.Module, scheme: Any, fmt: Any, state: dict) -> _Alike | str:
    """What makes two modules' packing stackable, or why this module is left to the loop."""
    if BaseCompressor.get_value_from_registry(fmt.value) is not PackedQuantizationCompressor:
        return f"format {fmt.value}"
    args = scheme.weights
    strategies = (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)
    if args is None or args.strategy not in strategies or args.type != "int" or not 1 <= args.num_bits <= 8:
        return "not a group or channel integer weight scheme"
    weight, scale = state.get("weight"), state.get("weight_scale")
    if not isinstance(weight, torch.Tensor) or not isinstance(scale, torch.Tensor):
        return "no weight or weight_scale"
    if weight.ndim != 2 or weight.device.type == "meta" or scale.ndim != 2 or scale.shape[0] != weight.shape[0]:
        return "not a 2-D weight with one scale row per output row"
    device = _execution_device(module, weight)
    if device.type not in BATCHED_DEVICES:
        return f"on {device.type} (batched on {', '.join(sorted(BATCHED_DEVICES)) or 'no device'})"
    if weight.shape[1] * args.num_bits % 32:
        return "row not a whole number of int32 words"
    if "weight_global_scale" in state:
        return "global scale"
    zero = state.get("weight_zero_point")
    if zero is not None and (not isinstance(zero, torch.Tensor) or zero.shape != scale.shape):
        return "zero point not shaped like the scales"
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in state.items() if isinstance(t, torch.Tensor))
    return _Alike(type(module), device, fmt, args.model_dump_json(), scheme.model_dump_json(exclude={"format"}), tensors,
                  tuple(sorted(state)))


def _chunks(members: list, weight_bytes: int, limit: int) -> Iterator[list]:
    per = max(1, limit // max(1, weight_bytes))
    for start in range(0, len(members), per):
        yield members[start:start + per]


def _packed_rows(states: list[dict], args: Any) -> list[torch.Tensor] | None:
    """Each module's int32 words, from one ``quantize`` and one ``pack_to_int32`` over the stacked rows (None:
    the onloaded tensors are not all on one device)."""
    if len({t.device for s in states for t in s.values() if isinstance(t, torch.Tensor)}) != 1:
        return None
    zero = [s.get("weight_zero_point") for s in states]
    quantized = quantize(
        x=torch.cat([s["weight"] for s in states]),
        scale=torch.cat([s["weight_scale"] for s in states]),
        zero_point=None if zero[0] is None else torch.cat(zero),
        args=args,
        dtype=torch.int8,
    )
    packed = pack_to_int32(quantized, args.num_bits)
    del quantized
    return [piece.clone() for piece in packed.split([s["weight"].shape[0] for s in states])]


def _replace(module: nn.Module, scheme: Any, fmt: Any, state: dict, words: torch.Tensor) -> None:
    """What ``PackedQuantizationCompressor.compress_module`` leaves, with the words computed already."""
    args = scheme.weights
    new = dict(state)
    weight = new.pop("weight")
    new["weight_packed"] = words
    new["weight_shape"] = torch.tensor(weight.shape)
    if not args.symmetric and args.strategy in PACK_ZP_STRATS:
        zero = state.get("weight_zero_point")
        assert zero is not None, "Asymmetric quant requires zero-point values"
        new["weight_zero_point"] = pack_to_int32(zero, args.num_bits, packed_dim=0).contiguous()
    new = PackedQuantizationCompressor._remove_symmetric_zp(new, scheme)
    scheme.format = fmt
    replace_direct_state_dict(module, new)
    module.quantization_status = QuantizationStatus.COMPRESSED


def compress_in_batches(
    model: nn.Module, forced_format: Any = None, *, skip_compressed: bool = True, chunk_bytes: int | None = None,
    refused: set | None = None,
) -> CompressionBatching:
    """Pack ``model``'s alike quantized Linears in stacked chunks, as ``compress_model`` would one by one.

    Args:
        model: the model about to be saved compressed.
        forced_format: the compressor's ``force_compression_format`` (the format ``compress_module`` is given).
        skip_compressed: leave modules already ``COMPRESSED`` alone (``compress_model``'s flag at save).
        chunk_bytes: the most weight bytes stacked at once (default :data:`CHUNK_BYTES`).
        refused: keys whose check failed before (filled here): those stay with the per-module loop.

    Returns:
        What was packed here; compressed-tensors' own loop packs the rest afterwards.
    """
    stats = CompressionBatching()
    refused = set() if refused is None else refused
    groups: dict[_Alike, list] = {}
    for _, module in model.named_modules(remove_duplicate=True):
        if not is_module_quantized(module):
            continue
        if skip_compressed and getattr(module, "quantization_status", None) == QuantizationStatus.COMPRESSED:
            continue
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(scheme, QuantizationScheme):
            continue
        fmt = _format_of(module, scheme, forced_format)
        with disable_onloading():  # shapes and names only: nothing moves to the execution device yet
            key = _key(module, scheme, fmt, get_direct_state_dict(module))
        if isinstance(key, str):
            stats.leave(key)
        elif key in refused:
            stats.leave("check failed earlier")
        else:
            groups.setdefault(key, []).append((module, scheme, fmt))
    for key, members in groups.items():
        if len(members) < 2:
            stats.leave("no alike module")
            continue
        stats.groups += 1
        done = _compress_group(key, members, chunk_bytes or CHUNK_BYTES, stats, refused)
        stats.modules += done
        if done < len(members):
            stats.leave("check failed or raised" if key in refused else "onloaded on several devices", len(members) - done)
    return stats


def _compress_group(key: _Alike, members: list, limit: int, stats: CompressionBatching, refused: set) -> int:
    """Pack one group chunk by chunk; returns how many of its modules were packed (the rest: the loop's)."""
    weight_bytes = next(math.prod(shape) * dtype.itemsize for name, shape, dtype, _ in key.tensors if name == "weight")
    done = 0
    for chunk in _chunks(members, weight_bytes, limit):
        states = [get_direct_state_dict(module) for module, _, _ in chunk]
        module, scheme, fmt = chunk[0]
        try:
            words = _packed_rows(states, scheme.weights)
            if words is None:
                return done
            own = PackedQuantizationCompressor.compress(states[0], scheme)["weight_packed"]
        except Exception as exc:  # nothing is swapped yet: compressed-tensors' loop packs these as it always did
            refused.add(key)
            logger.warning("batched packing of %d %s module(s) failed (%s: %s); those are packed one by one",
                           len(members) - done, type(module).__name__, type(exc).__name__, exc)
            return done
        stats.chunks += 1
        stats.checked += 1
        if own.shape != words[0].shape or own.dtype != words[0].dtype or not torch.equal(own, words[0]):
            stats.mismatched += 1
            refused.add(key)
            logger.warning("batched packing of %d %s module(s) differed from compressed-tensors' own compress: those "
                           "are packed one by one", len(members) - done, type(module).__name__)
            return done
        for (module, scheme, fmt), state, packed in zip(chunk, states, words):
            _replace(module, scheme, fmt, state, packed)
        done += len(chunk)
    return done


@contextmanager
def batched_compression(stats: CompressionBatching | None = None) -> Iterator[CompressionBatching]:
    """Inside: ``ModelCompressor.compress_model(model, skip_compressed=True)`` (llm-compressor's save) packs
    the alike modules in batches first (:func:`compress_in_batches`), then runs compressed-tensors' own loop
    for the rest. Outside, and under ``torchrun`` (compressed-tensors spreads the modules over the ranks),
    nothing changes. Yields the counts, summed over the calls inside."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor

    from defuser_quant.calibration import distributed

    stats = CompressionBatching() if stats is None else stats
    refused: set = set()
    with _PATCH_LOCK:
        original = ModelCompressor.__dict__["compress_model"]

        @functools.wraps(original)
        def compress_model(self: Any, model: nn.Module, skip_compressed: bool = False) -> None:
            if skip_compressed and not distributed.is_distributed():
                _add(stats, compress_in_batches(model, self.force_compression_format, refused=refused))
            return original(self, model, skip_compressed)

        ModelCompressor.compress_model = compress_model
        try:
            yield stats
        finally:
            ModelCompressor.compress_model = original


def _add(total: CompressionBatching, one: CompressionBatching) -> None:
    for name in ("modules", "groups", "chunks", "checked", "mismatched"):
        setattr(total, name, getattr(total, name) + getattr(one, name))
    for reason, count in one.left.items():
        total.leave(reason, count)
    if one.modules:
        logger.info("packed %d quantized module(s) in %d batched chunk(s) of %d group(s); %d left to the per-module "
                    "loop", one.modules, one.chunks, one.groups, sum(one.left.values()))


def with_batched_compression(save_pretrained: Callable[..., Any], stats: CompressionBatching) -> Callable[..., Any]:
    """``save_pretrained`` (llm-compressor's compressed save) run inside :func:`batched_compression`."""

    @functools.wraps(save_pretrained)
    def save_with_batched_compression(*args: Any, **kwargs: Any) -> Any:
        with batched_compression(stats):
            return save_pretrained(*args, **kwargs)

    return save_with_batched_compression
