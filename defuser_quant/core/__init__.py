"""The engine: detect fused expert blocks, defuse them, re-fuse them, patch classes before load.

Imports torch and transformers only: nothing from ``checkpoint``, ``jobs``, ``cli``, ``tools``,
the integrations, the calibration layer or any quantizer (``tests/test_architecture.py``).
"""

from .defuse import convert_model
from .defused import DefusedExpert, DefusedExperts
from .discovery import find_fused_blocks
from .errors import (
    ConversionError,
    DefuserQuantError,
    FilterRuleError,
    FuseError,
    LayoutError,
    SharedStorageError,
    UnmodelledStructureError,
    UnsupportedModelError,
)
from .filters import FilterRules
from .fuse import fuse_model, temporarily_fused
from .layout import ExpertLayout, is_fused_experts_class, layout_of
from .patching import replace_fused_blocks, restore_fused_blocks
from .report import BlockRecord, ConversionReport

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
    "UnmodelledStructureError",
    "UnsupportedModelError",
    "convert_model",
    "find_fused_blocks",
    "fuse_model",
    "is_fused_experts_class",
    "layout_of",
    "replace_fused_blocks",
    "restore_fused_blocks",
    "temporarily_fused",
]
