"""Fused fine-grained FP8 checkpoints (Transformers' ``quant_method: fp8``), written with plain torch.

``write_fused_fp8`` quantizes a float checkpoint into exactly the tensors Transformers' FP8 loader
builds (``FP8Experts`` fused ``gate_up_proj``/``down_proj`` float8_e4m3fn with float32
``*_scale_inv`` block scales, ``FP8Linear`` ``weight``/``weight_scale_inv``): the set of FP8 tensors
is read from a meta skeleton that went through Transformers' own ``replace_with_fp8_linear``, so the
file matches what ``from_pretrained`` expects. Used by tests and ``benchmarks/load_formats.py``
(it needs only torch, transformers and safetensors).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int], pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[..., R, C]`` -> (float8_e4m3fn ``[..., R, C]``, float32 ``scale_inv`` ``[..., R/bn, C/bk]``).

    Dequantization is ``q * scale_inv`` per ``bn x bk`` block (edge blocks may be partial). ``pow2``: scales rounded up to powers of two (what ``scale_fmt: ue8m0`` stores).
    """
    bn, bk = block
    rows, cols = weight.shape[-2:]
    pad_r, pad_c = -rows % bn, -cols % bk  # partial edge blocks, as Transformers' FP8 layout allows
    w = torch.nn.functional.pad(weight.float(), (0, pad_c, 0, pad_r))
    lead = weight.shape[:-2]
    w = w.reshape(*lead, (rows + pad_r) // bn, bn, (cols + pad_c) // bk, bk)
    amax = w.abs().amax(dim=(-3, -1))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if pow2:
        scale_inv = torch.exp2(torch.ceil(torch.log2(scale_inv)))
    q = (w / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    q = q.reshape(*lead, rows + pad_r, cols + pad_c)[..., :rows, :cols].contiguous()
    return q, scale_inv.to(torch.float32)


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_blocks`` (block size read from the scale grid)."""
    rows, cols = q.shape[-2:]
    bn, bk = -(-rows // scale_inv.shape[-2]), -(-cols // scale_inv.shape[-1])
    scale = scale_inv.float().repeat_interleave(bn, -2)[..., :rows, :].repeat_interleave(bk, -1)[..., :cols]
    return (q.float() * scale).to(dtype)


def fp8_skeleton(config, block: tuple[int, int], not_convert: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` of the model Transformers' FP8 loader builds for ``config`` (on meta)."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fp8 = FineGrainedFP8Config(weight_block_size=list(block), modules_to_not_convert=not_convert)
    replace_with_fp8_linear(skeleton, not_convert, fp8, pre_quantized=True)
    return {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}


def _per_expert(out: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Fused qwen3_moe-style expert keys split into ``experts.{e}.{gate,up,down}_proj.weight`` (+ scales)."""
    split = {}
    for key, tensor in out.items():
        if key.endswith(".experts.gate_up_proj") or key.endswith(".experts.down_proj"):
            prefix, name = key.rsplit(".", 1)
            scale = out[f"{key}_scale_inv"]
            for e in range(tensor.shape[0]):
                if name == "gate_up_proj":
                    inter, rows = tensor.shape[1] // 2, tensor.shape[1] // 2 // block[0]
                    parts = {"gate_proj": (tensor[e, :inter], scale[e, :rows]), "up_proj": (tensor[e, inter:], scale[e, rows:])}
                else:
                    parts = {"down_proj": (tensor[e], scale[e])}
                for proj, (w, sc) in parts.items():
                    split[f"{prefix}.{e}.{proj}.weight"] = w.contiguous()
                    split[f"{prefix}.{e}.{proj}.weight_scale_inv"] = sc.contiguous()
        elif not key.endswith("_proj_scale_inv") or ".experts." not in key:
            split[key] = tensor
    return split


def write_fused_fp8(src: Path, dst: Path, block: tuple[int, int] = (128, 128), *, per_expert: bool = False,
                    **config_overrides) -> Path:
    """Quantize the float checkpoint ``src`` (any layout Transformers loads) into a fused FP8 one at ``dst``.

    ``per_expert``: store the experts as per-expert keys (as DeepSeek/Qwen FP8 releases do) instead.
    ``config_overrides`` go into ``quantization_config`` (e.g. ``scale_fmt``) for the refusal tests.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    src, dst = Path(src), Path(dst)
    config = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)  # stock: fused experts
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    layers = config.num_hidden_layers
    not_convert = ["lm_head"] + [f"model.layers.{i}.mlp.gate" for i in range(layers)]
    skeleton = fp8_skeleton(config, block, not_convert)
    out = {}
    for key, tensor in tensors.items():
        shape, dtype = skeleton[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{key}: checkpoint {tuple(tensor.shape)} vs FP8 skeleton {shape}")
        if dtype == FP8:
            q, scale_inv = quantize_blocks(tensor, block)
            scale_key = key[: -len(".weight")] + ".weight_scale_inv" if key.endswith(".weight") else key + "_scale_inv"
            if skeleton[scale_key][0] != tuple(scale_inv.shape):
                raise ValueError(f"{scale_key}: {tuple(scale_inv.shape)} vs FP8 skeleton {skeleton[scale_key][0]}")
            out[key], out[scale_key] = q, scale_inv
        else:
            out[key] = tensor.contiguous()
    if per_expert:
        out = _per_expert(out, block)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block),
        "modules_to_not_convert": not_convert, "scale_fmt": "float", **config_overrides,
    }
    (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for side in src.iterdir():
        if side.name not in {"config.json", "model.safetensors", "model.safetensors.index.json"} and side.is_file() \
                and not side.name.endswith(".safetensors"):
            shutil.copy2(side, dst / side.name)
    return dst


# ----- a plain-torch stand-in for Transformers' FP8 hub kernel -----------------------------------


def _act_dequant(x: torch.Tensor, group: int, activation_scale: torch.Tensor | None) -> torch.Tensor:
    """Activations as the FP8 kernels see them: e4m3 per token and ``group`` columns (dynamic) or one
    static scale, dequantized back to float32."""
    x = x.float()
    if activation_scale is not None:
        scale = activation_scale.float()
        return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
    xg = x.view(x.shape[0], -1, group)
    scale = xg.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return ((xg / scale).to(FP8).float() * scale).view_as(x)


def torch_fp8_matmul(input, weight, weight_scale_inv, block_size, output_dtype=None, activation_scale=None):
    """The kernel's ``matmul_2d``: FP8 activations (per token x ``block_k``) times FP8 block weights."""
    k = input.shape[-1]
    x = _act_dequant(input.reshape(-1, k), block_size[1] if block_size is not None else k, activation_scale)
    w = dequantize_blocks(weight, weight_scale_inv) if block_size is not None else weight.float() * weight_scale_inv.float()
    return (x @ w.T).to(output_dtype or input.dtype).view(*input.shape[:-1], weight.shape[0])


def torch_fp8_batched_matmul(x, weight, weight_scale_inv, block_size=None, expert_ids=None):
    out = torch.zeros(x.shape[0], weight.shape[1], dtype=x.dtype, device=x.device)
    for e in expert_ids.unique().tolist():
        if e < weight.shape[0]:
            rows = expert_ids == e
            out[rows] = torch_fp8_matmul(x[rows], weight[e], weight_scale_inv[e], block_size)
    return out


def torch_fp8_grouped_matmul(x, weight, weight_scale_inv, offsets=None, tokens_per_expert=None, block_size=None):
    out = torch.zeros(x.shape[0], weight.shape[1], dtype=x.dtype, device=x.device)
    ends = offsets.long().tolist()
    starts = [0] + ends[:-1]
    for e, (start, end) in enumerate(zip(starts, ends)):
        if end > start:
            out[start:end] = torch_fp8_matmul(x[start:end], weight[e], weight_scale_inv[e], block_size)
    return out


class torch_fp8_kernels:
    """Context manager: Transformers' fine-grained FP8 kernel entry points replaced by the plain-torch
    ones above (for CPUs, and GPUs that cannot fetch ``kernels-community/finegrained-fp8``); DeepGEMM off."""

    def __enter__(self):
        import os

        from transformers.integrations import finegrained_fp8

        self._module = finegrained_fp8
        self._saved = finegrained_fp8._FINEGRAINED_FP8
        self._env = os.environ.get("TRANSFORMERS_DISABLE_DEEPGEMM_LINEAR")
        os.environ["TRANSFORMERS_DISABLE_DEEPGEMM_LINEAR"] = "1"
        finegrained_fp8._FINEGRAINED_FP8 = finegrained_fp8.FineGrainedFP8(
            matmul=torch_fp8_matmul, batched_matmul=torch_fp8_batched_matmul, grouped_matmul=torch_fp8_grouped_matmul)
        return self

    def __exit__(self, *exc):
        import os

        self._module._FINEGRAINED_FP8 = self._saved
        if self._env is None:
            os.environ.pop("TRANSFORMERS_DISABLE_DEEPGEMM_LINEAR", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_DEEPGEMM_LINEAR"] = self._env
        return False


def hub_fp8_kernel_available() -> bool:
    """True when Transformers can load the real ``kernels-community/finegrained-fp8`` kernel here."""
    try:
        from transformers.integrations.finegrained_fp8 import load_finegrained_fp8_kernel

        load_finegrained_fp8_kernel()
        return True
    except Exception:
        return False
