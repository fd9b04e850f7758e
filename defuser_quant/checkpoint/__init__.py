"""Offline checkpoint conversion between per-expert and fused experts layouts.

::

    from defuser_quant.checkpoint import convert_checkpoint

    report = convert_checkpoint("Qwen3-30B-A3B", "Qwen3-30B-A3B-per-expert", to="per-expert")
    print(report.summary())

Only headers and ``config.json`` are read up front (the model is built on ``meta``); tensors
are streamed shard by shard, so memory stays near one expert slab whatever the model size.
"""

from .convert import convert_checkpoint
from .errors import CheckpointError, DestinationError
from .meta import BlockScan, ExpertBlock, build_meta_model, load_config, scan_blocks
from .plan import TARGETS, BlockAction
from .report import CheckpointReport, ProgressUpdate

__all__ = [
    "TARGETS",
    "BlockAction",
    "BlockScan",
    "CheckpointError",
    "CheckpointReport",
    "DestinationError",
    "ExpertBlock",
    "ProgressUpdate",
    "build_meta_model",
    "convert_checkpoint",
    "load_config",
    "scan_blocks",
]
