"""``load``: ``from_pretrained`` under the pre-load patch, then proof that the experts loaded as stored."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from ..core.defused import DefusedExperts
from ..core.discovery import find_fused_blocks
from ..core.patching import replace_fused_blocks, restore_fused_blocks
from .errors import LoadError
from .formats import checkpoint_format

logger = logging.getLogger(__name__)

_PACKED = ("qweight", "weight_packed")
_KNOWN_PACKAGES = ("torch", "transformers", "defuser_quant", "gptqmodel", "compressed_tensors", "optimum")


def _model_class(config: Any, model_class: type | None) -> type:
    if model_class is not None:
        return model_class
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return cls
    return transformers.AutoModelForCausalLM


def stored_quantized_modules(path: Path) -> set[str]:
    """Module paths whose stored tensors are quantized (packed, or one-byte weights), from the headers."""
    from ..checkpoint.source import read_headers, shard_files

    found = set()
    for name, info in read_headers(path, shard_files(path)).items():
        module, _, leaf = name.rpartition(".")
        if leaf in _PACKED or (leaf == "weight" and info.dtype in ("F8_E4M3", "F8_E5M2", "I8")):
            found.add(module)
    return found


def is_quantized_module(module: nn.Module) -> bool:
    """True when ``module`` holds a packed weight or a one-byte weight (not a float ``weight``)."""
    tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
    if any(name in tensors for name in _PACKED):
        return True
    weight = tensors.get("weight")
    return weight is not None and weight.element_size() == 1


def expert_projections(model: nn.Module) -> dict[str, nn.Module]:
    """Every leaf module inside the defused expert blocks of ``model``, by path."""
    found = {}
    for path, block in model.named_modules():
        if isinstance(block, DefusedExperts):
            for name, module in block.named_modules():
                if name and not any(True for _ in module.children()):
                    found[f"{path}.{name}"] = module
    return found


def _verify(model: nn.Module, path: Path, quantized: bool) -> int:
    """Raise ``LoadError`` unless every experts block is defused and every stored-quantized expert
    projection is quantized in ``model``; returns how many projections are quantized."""
    fused = [b.path for b in find_fused_blocks(model, dense=False) if not b.defused]
    if fused:
        raise LoadError(f"{path}: experts blocks still fused after loading ({', '.join(fused[:3])}); this family is not patched by replace_fused_blocks")
    projections = expert_projections(model)
    if not projections:
        foreign = sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()
                          if type(m).__module__.split(".")[0] not in _KNOWN_PACKAGES})
        cause = (
            f"; its blocks were built by {', '.join(foreign[:3])}: another tool replaced this family's classes "
            "(stock GPTQModel.load installs Defuser's patch for the whole process), load in a fresh process"
            if foreign else "; defuser_quant.load is for MoE checkpoints"
        )
        raise LoadError(f"{path}: the loaded model has no defused experts blocks{cause}")
    if not quantized:
        return 0
    stored = stored_quantized_modules(path)
    dequantized = sorted(p for p in projections if p in stored and not is_quantized_module(projections[p]))
    if dequantized:
        raise LoadError(
            f"{path}: {len(dequantized)} expert projection(s) stored quantized loaded as float weights "
            f"({', '.join(dequantized[:4])}): the quantizer integration dequantized them; do not pass dequantize=True"
        )
    return sum(is_quantized_module(m) for m in projections.values())


def load(path: str | Path, *, model_class: type | None = None, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load the MoE checkpoint at ``path`` into Transformers with every experts block defused.

    Per-expert and fused float checkpoints load into per-expert ``nn.Linear`` modules; GPTQ/AWQ
    (as GPTQModel writes them) and compressed-tensors per-expert checkpoints load with the experts
    kept quantized, through Transformers' own quantizer integrations. Fine-grained FP8
    (``quant_method: fp8``, fused or per-expert) loads into Transformers' ``FP8Experts`` and is
    defused after loading into per-expert ``FP8Linear`` views (needs a CUDA/XPU device with FP8
    kernels; elsewhere it is refused unless ``quantization_config=FineGrainedFP8Config(dequantize=True)``
    asks for float experts). The family is patched only
    for the duration of the call (left patched if it already was). Raises ``ExpertLoadError`` when
    any expert tensor does not load (the experts would be random), ``LoadError`` for a format it
    does not handle or experts that did not stay as stored. ``model_class`` defaults to the
    config's architecture; other keyword arguments go to ``from_pretrained``.
    """
    from transformers import AutoConfig

    root = Path(path)
    if not (root / "config.json").is_file():
        raise LoadError(f"{root}: no config.json; pass a local checkpoint directory written by save_pretrained")
    trust = from_pretrained_kwargs.get("trust_remote_code", False)
    config = AutoConfig.from_pretrained(str(root), trust_remote_code=trust)
    fmt = checkpoint_format(config)
    cls = _model_class(config, model_class)
    if fmt.method == "fp8":
        from .fp8 import load_fp8

        model, count = load_fp8(root, config, cls, from_pretrained_kwargs)
        _verify(model, root, quantized=count > 0)
        logger.info("loaded %s (fp8): experts defused, %d expert projections FP8", root, count)
        return model
    patched_here = replace_fused_blocks(config.model_type)
    try:
        model = cls.from_pretrained(str(root), **from_pretrained_kwargs)
    finally:
        if patched_here:
            restore_fused_blocks(config.model_type)
    count = _verify(model, root, fmt.quantized)
    logger.info("loaded %s (%s): experts defused, %d expert projections quantized", root, fmt.method, count)
    return model
