"""defuser-quant: defuse fused MoE experts into per-expert nn.Linear modules and re-fuse them.

Public API::

    from defuser_quant import convert_model, fuse_model, replace_fused_blocks

    report = convert_model(model, filter=["-:visual"])   # after load, in place
    fuse_model(model)                                      # back to the native classes
    replace_fused_blocks("qwen3_moe")                      # before from_pretrained
    supported_model_types()                                # every model type either covers
    model = load("ckpt")                                   # any MoE checkpoint, experts defused (and kept quantized)
"""

from . import _legacy, core
from .core import *  # noqa: F401,F403 - the engine's public names (core.__all__)

_legacy.install()


def __getattr__(name: str):
    # Lazy, so `python -m defuser_quant.tools.families_table` does not import itself twice.
    if name in ("supported_families", "supported_model_types"):
        from .tools import families_table

        return getattr(families_table, name)
    if name == "load":  # lazy: the loader reads checkpoint headers (defuser_quant.checkpoint)
        from .loading import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0.dev0"

__all__ = [*core.__all__, "supported_families", "supported_model_types"]
