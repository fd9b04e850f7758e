"""Adapters for fused experts classes Transformers does not describe with layout facts.

One module per kind of irregularity; ``defuser_quant.core.families`` names which class uses which.
"""

from .base import StandardAdapter

__all__ = ["StandardAdapter"]
