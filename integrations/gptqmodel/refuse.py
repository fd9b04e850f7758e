"""Re-fuse on save: a dequantized checkpoint of the native fused classes, for evaluation.

GPTQModel saves per-expert quantized tensors under the defused names
(``experts.{i}.gate_proj.qweight``...). No loader reads *quantized* experts stacked into
Transformers' fused layout (Transformers 5.17 has fused quantized experts only for FP8 and
gpt_oss MXFP4), so the re-fused format offered here is float: every quantized Linear is
dequantized back to the model dtype (``w = (q - z) * s`` exactly as the kernels compute it),
the experts are stacked into the family's fused tensors with ``fuse_model``, and the result is
written with Transformers' ``save_pretrained``. Stock ``AutoModelForCausalLM.from_pretrained``
loads it into the native fused class, so quantization error can be measured with the fused
expert kernels (``grouped_mm``, ``batched_mm``) and any eval harness, no GPTQModel needed.

The quantized model is read, never modified: the float model is built separately (meta
device, then materialised), so peak memory is the quantized model plus one float copy.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

from defuser_quant.core import convert_model, fuse_model
from defuser_quant.core.defused import DefusedExperts
from defuser_quant.core.errors import DefuserQuantError


logger = logging.getLogger(__name__)

Layout = Literal["fused", "original"]


class RefuseError(DefuserQuantError):
    """A quantized model cannot be dequantized into a fused float checkpoint."""


@contextmanager
def _v2_zero_points(module: nn.Module) -> Iterator[None]:
    """GPTQ modules right after ``quantize()`` hold v1 zero points (stored ``z - 1``); the
    dequantizer expects v2. Convert a copy for the duration, leaving the module as it was."""
    fmt = getattr(module, "qzero_format", None)
    if not callable(fmt) or fmt() != 1:
        yield
        return
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    original = module.qzeros.data
    module.qzeros.data = original.clone()
    try:
        convert_gptq_v1_to_v2_format_module(module=module, bits=module.bits, pack_dtype=module.pack_dtype)
        yield
    finally:
        module.qzeros.data = original
        module.qzero_format(format=1)


def dequantize_linear(module: nn.Module) -> torch.Tensor:
    """The float weight ``[out_features, in_features]`` a GPTQ/AWQ quant linear computes with.

    Uses GPTQModel's own unpacking (``PackableQuantLinear.dequantize_weight`` for GPTQ,
    ``dequantize_gemm`` for AWQ GEMM). Kernels that repacked their weights for inference
    (CPU int4pack after a forward, Marlin, ...) cannot be read back: load the checkpoint with
    ``backend=BACKEND.TORCH`` (GPTQ) or ``BACKEND.AWQ_TORCH`` instead, or pass its directory.
    """
    from gptqmodel.nn_modules.qlinear import AWQuantLinear, PackableQuantLinear

    if getattr(module, "linear_mode", None) == "inference":
        raise RefuseError(
            f"{type(module).__name__} repacked its weights for CPU inference; pass the saved checkpoint "
            "directory (it is reloaded with the torch kernels) or dequantize before running the model"
        )
    with torch.inference_mode():  # GPTQModel's packed tensors are inference tensors
        weight = _dequantize(module, AWQuantLinear, PackableQuantLinear)
    return weight.clone()  # outside inference mode: a normal tensor


def _dequantize(module: nn.Module, AWQuantLinear: type, PackableQuantLinear: type) -> torch.Tensor:
    if isinstance(module, AWQuantLinear) and all(getattr(module, n, None) is not None for n in ("qweight", "qzeros", "scales")):
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        weight = dequantize_gemm(module.qweight, module.qzeros, module.scales, module.bits, module.group_size)
    elif isinstance(module, PackableQuantLinear) and getattr(module, "qweight", None) is not None:
        with _v2_zero_points(module):
            weight = PackableQuantLinear.dequantize_weight(module)
    else:
        raise RefuseError(
            f"no dequantizer for {type(module).__name__}; reload the checkpoint with backend=BACKEND.TORCH "
            "(GPTQ) or BACKEND.AWQ_TORCH (AWQ), or pass its directory"
        )
    return weight[: module.in_features, : module.out_features].T


def _load(source: str | Path) -> Any:
    import json

    from gptqmodel import BACKEND, GPTQModel

    qcfg = json.loads((Path(source) / "quantize_config.json").read_text())
    method = str(qcfg.get("method", qcfg.get("quant_method", "gptq"))).lower()
    backend = BACKEND.AWQ_TORCH if method == "awq" else BACKEND.TORCH
    return GPTQModel.load(str(source), device="cpu", backend=backend)


def _float_model(hf: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A defused float model with ``hf``'s structure and projection names, on the CPU (empty)."""
    config = copy.deepcopy(hf.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        native = type(hf)(config)
    convert_model(native, show_progress=False)
    names = {p: b.names for p, b in hf.named_modules() if isinstance(b, DefusedExperts)}
    for path, block in native.named_modules():
        if isinstance(block, DefusedExperts) and path in names and block.names != names[path]:
            block.rename_projections(names[path])
    return native.to(dtype).to_empty(device="cpu")


def _fill(native: nn.Module, hf: nn.Module, dtype: torch.dtype) -> int:
    """Copy every tensor of ``hf`` into ``native``, dequantizing quant linears. Returns their count."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    sources = dict(hf.named_modules())
    dequantized = 0
    for name, module in native.named_modules():
        source = sources.get(name)
        local = [*module._parameters.items(), *module._buffers.items()]
        if not local:
            continue
        if source is None:
            raise RefuseError(f"{name}: not found in the quantized model")
        if isinstance(source, BaseQuantLinear):
            module.weight.copy_(dequantize_linear(source).to(dtype))
            if module.bias is not None:
                module.bias.copy_(source.bias)
            dequantized += 1
            continue
        for tensor_name, tensor in local:
            if tensor is None:
                continue
            value = getattr(source, tensor_name, None)
            if not isinstance(value, torch.Tensor):
                raise RefuseError(f"{name}.{tensor_name}: missing in the quantized model")
            if value.device.type == "meta":
                raise RefuseError(
                    f"{name}.{tensor_name} is offloaded (meta) in the in-memory model: save it with model.save(dir) "
                    "and pass the directory"
                )
            if value.dtype == tensor.dtype:
                tensor.copy_(value)
            else:  # keep the source dtype (fp32 router biases, ...)
                tensor.data = value.detach().clone()
    return dequantized


def save_dequantized_fused(
    source: Any,
    out_dir: str | Path,
    *,
    layout: Layout = "fused",
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write a float checkpoint of the native fused model that stock Transformers loads.

    Args:
        source: a GPTQModel model (after ``quantize()`` or from ``GPTQModel.load``) or the
            directory of a saved GPTQModel checkpoint (reloaded on CPU with the torch kernels).
        out_dir: output directory (config, safetensors, generation config, tokenizer).
        layout: ``"fused"`` writes the v5 fused tensors (``experts.gate_up_proj``...);
            ``"original"`` lets Transformers revert to the family's per-expert checkpoint keys.
            Both load into the native fused class.
        dtype: float dtype of the output (default: the model's dtype).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    model = _load(source) if isinstance(source, (str, Path)) else source
    hf = model.model
    dtype = dtype or getattr(hf.config, "dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    native = _float_model(hf, dtype)
    with torch.no_grad():
        count = _fill(native, hf, dtype)
    fuse_model(native, show_progress=False)
    if getattr(hf, "generation_config", None) is not None:
        native.generation_config = copy.deepcopy(hf.generation_config)
    out = Path(out_dir)
    native.save_pretrained(out, save_original_format=(layout == "original"), max_shard_size=max_shard_size)
    tokenizer = getattr(model, "tokenizer", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # GPTQModel wraps it (tokenicer)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    logger.info("wrote dequantized %s checkpoint (%d linears dequantized) to %s", layout, count, out)
    return out
