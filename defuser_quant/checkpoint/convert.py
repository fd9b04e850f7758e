"""``convert_checkpoint``: per-expert <-> fused experts, shard by shard, never loading the model."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from .errors import CheckpointError
from .meta import build_meta_model, load_config, scan_blocks
from .plan import ConversionPlan, PlannedTensor, Target, plan_conversion
from .report import CheckpointReport, ProgressUpdate
from .sidefiles import copy_side_files
from .source import TensorInfo, read_headers, shard_files
from .staging import check_destination, staged_directory
from .stream import layout_shards, parse_size, shard_names, verify_output, write_index, write_shards

logger = logging.getLogger(__name__)

ProgressFn = Callable[[ProgressUpdate], None]


def _check_accounting(infos: dict[str, TensorInfo], plan: ConversionPlan) -> None:
    """Fusing and splitting move bytes, never create or drop them (except the unused slabs of
    identity experts, which splitting drops and fusing writes as zeros)."""
    bytes_in = sum(i.nbytes for i in infos.values())
    bytes_out = sum(t.nbytes for t in plan.tensors)
    unused_delta = sum(b.nbytes_out - b.nbytes for b in plan.blocks if b.unused_slabs)
    expected = len(infos) + sum(b.tensors_out - b.tensors_in for b in plan.blocks)
    moved = all(b.nbytes_out == b.nbytes for b in plan.blocks if not b.unused_slabs and b.found != "missing")
    if bytes_in + unused_delta != bytes_out or len(plan.tensors) != expected or not moved:
        raise CheckpointError(
            f"plan does not add up: {len(infos)} tensors / {bytes_in} bytes in, "
            f"{len(plan.tensors)} tensors / {bytes_out} bytes out (expected {expected} tensors)"
        )


def _warnings(plan: ConversionPlan, to: str, model_type: str) -> list[str]:
    out = []
    if plan.unmatched:
        out.append(
            f"{len(plan.unmatched)} expert-like tensors match no block of the model and are copied as is "
            f"(e.g. {plan.unmatched[0]})"
        )
    padded = [b for b in plan.blocks if b.unused_slabs and b.action in ("merged", "split")]
    if padded:
        what = "dropped" if to == "per-expert" else "written as zeros"
        out.append(
            f"{padded[0].class_name}: {sum(b.unused_slabs for b in padded)} fused slabs that no expert uses "
            f"(identity experts) are {what}"
        )
    if to == "per-expert" and not all(b.stock_loadable for b in plan.blocks):
        out.append(
            f"stock Transformers loads {model_type} experts only fused: load this checkpoint after "
            f"defuser_quant.replace_fused_blocks({model_type!r}), or convert it back with --to fused"
        )
    if plan.blocks and all(b.action in ("kept", "missing") for b in plan.blocks):
        out.append(f"every experts block is already {to}: the checkpoint is copied as is")
    return out


def _progress_fn(progress: bool | ProgressFn | None, total: int) -> tuple[ProgressFn | None, Callable[[], None]]:
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="convert", unit="tensor")
    return (lambda update: bar.update(1)), bar.close


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: Target = "fused",
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    fsync: bool = True,
    workers: int = 2,
    progress: bool | ProgressFn | None = None,
) -> CheckpointReport:
    """Convert the experts of a safetensors checkpoint to ``to`` ("fused" or "per-expert").

    Reads ``config.json`` to build the model on the ``meta`` device (module paths, layouts and
    per-expert names; no weights), plans every output tensor from the shard headers, then streams
    tensor by tensor from memory-mapped shards into new shards of at most ``max_shard_size``
    bytes, keeping about one expert slab in memory. Non-weight files are copied. Everything is
    written into a hidden sibling of ``dst`` and verified (names, dtypes, shapes, counts, index)
    before it is renamed to ``dst``; SRC is only read.

    Args:
        src: checkpoint directory (``model.safetensors`` or an index with shards).
        dst: output directory; must not be SRC, inside SRC, or non-empty unless ``overwrite``.
        to: "fused" (Transformers' native ``experts.gate_up_proj``) or "per-expert"
            (``experts.{e}.<proj>.weight`` with the family's names, e.g. mixtral w1/w3/w2).
        max_shard_size: bytes per output shard, an int or a string like "5GB" or "500MiB".
        overwrite: replace a non-empty ``dst``.
        fsync: flush every shard to disk before the final rename.
        workers: shards written at the same time (threads; 1 for strictly sequential I/O).
        progress: True for a tqdm bar, or a callback receiving ``ProgressUpdate`` per tensor.

    Returns:
        A ``CheckpointReport``. Raises ``CheckpointError`` (``DestinationError`` for unsafe
        destinations) before anything is written when the checkpoint cannot be converted.
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"SRC {src} is not a directory")
    check_destination(src, dst, overwrite)
    limit = parse_size(max_shard_size)
    config = load_config(src, local_only=True)
    if getattr(config, "quantization_config", None):
        raise CheckpointError(
            f"{src} is a quantized checkpoint (quantization_config in config.json); convert handles unquantized weights only"
        )
    model = build_meta_model(config)
    scan = scan_blocks(model)
    blocks = scan.blocks
    model_type = getattr(config, "model_type", "?")
    if not blocks:
        raise CheckpointError(f"{type(model).__name__} ({model_type}) has no fused experts blocks: nothing to convert")
    files = shard_files(src)
    infos = read_headers(src, files)
    plan = plan_conversion(infos, model, blocks, to)
    del model
    missing = [b for b in plan.blocks if b.found == "missing"]
    if missing:
        raise CheckpointError(
            f"{len(missing)} of {len(plan.blocks)} experts block(s) have no tensors convert recognises in {src} "
            f"(e.g. {missing[0].path}, {missing[0].class_name}): the checkpoint stores them in a format that "
            "Transformers converts only while loading (step3p7, for one, stacks gate/up/down per projection). "
            "Load the model and save it with save_pretrained(dir, save_original_format=False) for the fused "
            "layout, then convert that"
        )
    _check_accounting(infos, plan)
    shards = layout_shards(plan.tensors, limit)
    names = shard_names(len(shards))
    report = CheckpointReport(
        str(src), str(dst), to, model_type, (config.architectures or [type(config).__name__])[0],
        blocks=plan.blocks, tensors_in=len(infos), tensors_out=len(plan.tensors),
        bytes_in=sum(i.nbytes for i in infos.values()), bytes_out=sum(t.nbytes for t in plan.tensors),
        shards_in=len(files), shards_out=len(shards), unmatched=plan.unmatched, warnings=_warnings(plan, to, model_type),
    )
    for warning in report.warnings:
        logger.warning(warning)
    on_update, close_bar = _progress_fn(progress, len(plan.tensors))
    done = [0, 0]

    def on_tensor(tensor: PlannedTensor) -> None:
        done[0] += 1
        done[1] += tensor.nbytes
        if on_update is not None:
            on_update(ProgressUpdate(done[0], len(plan.tensors), done[1], report.bytes_out, tensor.name))

    try:
        with staged_directory(dst) as stage:
            report.side_files = copy_side_files(src, stage, files)
            write_shards(stage, shards, names, src, on_tensor, fsync=fsync, workers=workers)
            write_index(stage, shards, names)
            checked = verify_output(stage, shards, names)
            if checked != len(plan.tensors):
                raise CheckpointError(f"verified {checked} tensors, planned {len(plan.tensors)}")
    finally:
        close_bar()
    report.seconds = time.perf_counter() - start
    logger.info("converted %s -> %s (%s): %d tensors in %.1f s", src, dst, to, report.tensors_out, report.seconds)
    return report
