"""Load any MoE checkpoint into Transformers with its experts defused and, when quantized, kept quantized.

::

    import defuser_quant

    model = defuser_quant.load("Qwen3-30B-A3B-GPTQ", dtype="auto")
"""

from .errors import LoadError
from .formats import CheckpointFormat, checkpoint_format
from .load import load

__all__ = ["CheckpointFormat", "LoadError", "checkpoint_format", "load"]
