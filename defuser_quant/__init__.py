"""defuser-quant: defuse fused MoE experts into per-expert nn.Linear modules and re-fuse them.

Public API::

    from defuser_quant import convert_model, fuse_model, replace_fused_blocks

    report = convert_model(model, filter=["-:visual"])   # after load, in place
    fuse_model(model)                                      # back to the native classes
    replace_fused_blocks("qwen3_moe")                      # before from_pretrained
    supported_model_types()                                # every model type either covers
"""

from .defuse import convert_model
from .defused import DefusedExpert, DefusedExperts
from .errors import (
    ConversionError,
    DefuserQuantError,
    FilterRuleError,
    FuseError,
    LayoutError,
    SharedStorageError,
    UnsupportedModelError,
)
from .filters import FilterRules
from .fuse import fuse_model, temporarily_fused
from .discovery import find_fused_blocks
from .layout import ExpertLayout, is_fused_experts_class, layout_of
from .patching import replace_fused_blocks, restore_fused_blocks
from .report import BlockRecord, ConversionReport
from .support import supported_families, supported_model_types

__version__ = "0.1.0.dev0"

__all__ = [
    "BlockRecord",
    "ConversionError",
    "ConversionReport",
    "DefusedExpert",
    "DefusedExperts",
    "DefuserQuantError",
    "ExpertLayout",
    "FilterRuleError",
    "FilterRules",
    "FuseError",
    "LayoutError",
    "SharedStorageError",
    "UnsupportedModelError",
    "convert_model",
    "find_fused_blocks",
    "fuse_model",
    "is_fused_experts_class",
    "layout_of",
    "replace_fused_blocks",
    "restore_fused_blocks",
    "supported_families",
    "supported_model_types",
    "temporarily_fused",
]
