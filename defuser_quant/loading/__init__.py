"""Load any MoE checkpoint into Transformers with its experts defused and, when quantized, kept quantized.

::

    import defuser_quant

    model = defuser_quant.load("Qwen3-30B-A3B-GPTQ", dtype="auto")
    model = defuser_quant.load("out/qwen3-moe-fp8", device_map="cuda")  # fine-grained FP8: experts stay FP8, defused
"""

from .errors import LoadError
from .formats import CheckpointFormat, checkpoint_format
from .fp8 import DefusedFP8Experts, defuse_fp8_experts
from .load import load

__all__ = ["CheckpointFormat", "DefusedFP8Experts", "LoadError", "checkpoint_format", "defuse_fp8_experts", "load"]
