"""Re-fuse a per-expert compressed-tensors checkpoint (what ``oneshot`` saves) for Transformers.

Two targets, both written as a new checkpoint folder next to the compressed-tensors one:

* ``"fp8_fused"``: Transformers' native fine-grained FP8 format (``quant_method: fp8``) that
  loads into ``FP8Experts``: per block ``experts.gate_up_proj`` float8_e4m3fn ``[E, 2I, H]`` with
  ``experts.gate_up_proj_scale_inv`` float32 ``[E, 2I/B0, H/B1]`` (gate rows first, then up) and
  ``experts.down_proj`` ``[E, H, I]`` with ``down_proj_scale_inv``; other FP8 Linears keep
  ``weight`` and get ``weight_scale_inv``. The bytes are those compressed-tensors wrote (no
  re-quantization): CT dequantizes ``weight * weight_scale`` and fine-grained FP8
  ``weight * weight_scale_inv``. Needs FP8 block scales with dynamic (or no) activation
  quantization on every quantized Linear, and ``I % B0 == 0``.
* ``"dequantized"``: every quantized Linear dequantized (compressed-tensors' own dequantizer),
  experts re-fused into the native Transformers class with ``fuse_model`` and saved with stock
  ``save_pretrained``: a plain bf16 checkpoint any Transformers loads. Activation quantization
  is dropped. Works for every compressed-tensors weight scheme.

Both hold the checkpoint in memory once. Nothing here imports llm-compressor.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from defuser_quant.core.errors import DefuserQuantError
from defuser_quant.core.naming import projection_names

__all__ = [
    "REFUSE_MODES",
    "RefuseError",
    "RefuseMode",
    "check_refusable",
    "refuse_checkpoint",
]

logger = logging.getLogger(__name__)

RefuseMode = Literal["dequantized", "fp8_fused"]
REFUSE_MODES: tuple[str, ...] = get_args(RefuseMode)
_FP8_FIX = (
    "Quantize with scheme FP8_BLOCK (float8 weights with [128, 128] block scales, dynamic activations) for every "
    "quantized Linear, or use refuse: dequantized (any scheme)"
)
_EXPERT_KEY = re.compile(r"^(?P<block>.+\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)\.(?P<param>weight|weight_scale)$")
_WRITTEN_BY_SAVE = {"config.json", "generation_config.json", "model.safetensors.index.json"}


class RefuseError(DefuserQuantError, ValueError):
    """The quantized model or checkpoint cannot be re-fused into the requested layout."""


def _get(args: Any, name: str) -> Any:
    return args.get(name) if isinstance(args, Mapping) else getattr(args, name, None)


def fp8_block_problem(scheme: Any) -> str | None:
    """Why ``scheme`` (a ``QuantizationScheme`` or its dict) cannot go to fine-grained FP8, or None."""
    weights = _get(scheme, "weights")
    if weights is None:
        return "its weights are not quantized"
    kind, bits, strategy = _get(weights, "type"), _get(weights, "num_bits"), _get(weights, "strategy")
    if kind != "float" or bits != 8:
        return f"its weights are {bits}-bit {kind}, not float8"
    if strategy != "block" or not _get(weights, "block_structure"):
        return f"its FP8 weights have {strategy} scales, not block scales"
    if _get(weights, "symmetric") is False:
        return "its weights are asymmetric (zero points)"
    acts = _get(scheme, "input_activations")
    if acts is not None and _get(acts, "dynamic") not in (True, "local"):
        return "its input activations are static (fine-grained FP8 experts quantize activations dynamically)"
    if _get(scheme, "output_activations") is not None:
        return "it quantizes output activations"
    return None


def check_refusable(
    mode: RefuseMode,
    schemes: Mapping[str, Any],
    *,
    expert_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[int, int] | None:
    """Check that modules quantized with ``schemes`` (``{module path: scheme}``) can be re-fused.

    Args:
        mode: ``"dequantized"`` or ``"fp8_fused"``.
        schemes: the quantization scheme of every quantized module (experts and others).
        expert_shapes: ``{gate or up projection path: (out_features, in_features)}``, for the
            ``I % block`` check of ``fp8_fused``.

    Returns:
        The FP8 block structure for ``fp8_fused`` (None for ``dequantized``).

    Raises:
        RefuseError: naming the modules and the fix.
    """
    if mode not in REFUSE_MODES:
        raise RefuseError(f"unknown refuse mode {mode!r}; choose from {REFUSE_MODES} (or false)")
    if mode == "dequantized":
        if any(_get(s, "input_activations") is not None for s in schemes.values()):
            logger.warning("refuse: dequantized drops the activation quantization of the recipe (weights only)")
        return None
    if not schemes:
        raise RefuseError(f"refuse: fp8_fused found no quantized module to re-fuse. {_FP8_FIX}.")
    problems = {path: why for path, s in schemes.items() if (why := fp8_block_problem(s))}
    if problems:
        path, why = next(iter(problems.items()))
        raise RefuseError(
            f"refuse: fp8_fused cannot re-fuse {len(problems)} module(s) into Transformers' fine-grained FP8 layout: "
            f"{path}: {why}. {_FP8_FIX}."
        )
    blocks = {tuple(_get(_get(s, "weights"), "block_structure")) for s in schemes.values()}
    if len(blocks) != 1:
        raise RefuseError(f"refuse: fp8_fused needs one FP8 block structure for the whole model, found {sorted(blocks)}")
    block = blocks.pop()
    for path, (out_features, _) in (expert_shapes or {}).items():
        if out_features % block[0]:
            raise RefuseError(
                f"refuse: fp8_fused: {path} has {out_features} output features, not a multiple of the block size "
                f"{block[0]}, so one FP8 scale block would straddle the gate and up halves of gate_up_proj. "
                "Use refuse: dequantized for this model."
            )
    return block  # type: ignore[return-value]


# ----- checkpoint IO ---------------------------------------------------------------------------


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RefuseError(f"{folder} holds no .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def _write_tensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: str = "5GB") -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(sources: Iterable[Path], dst: Path, skip: Iterable[str] = ()) -> None:
    """Tokenizer, chat template, generation config...: every file but weights and ``skip``, first source wins."""
    skip = set(skip)
    for src in sources:
        if not src.is_dir():
            continue
        for item in src.iterdir():
            if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".pt")) and item.name not in skip:
                if not (dst / item.name).exists():
                    shutil.copy2(item, dst / item.name)


def _load_ct_config(src: Path) -> tuple[dict, Any]:
    from compressed_tensors.quantization import QuantizationConfig

    config = json.loads((src / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise RefuseError(f"{src}: config.json has no compressed-tensors quantization_config; nothing to re-fuse")
    return config, QuantizationConfig.model_validate(qc)


# ----- fp8_fused -------------------------------------------------------------------------------


def _expert_blocks(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[tuple[int, str, str], torch.Tensor]]:
    blocks: dict[str, dict[tuple[int, str, str], torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if match := _EXPERT_KEY.match(key):
            blocks.setdefault(match["block"], {})[(int(match["index"]), match["proj"], match["param"])] = tensor
    return blocks


def _fuse_fp8_block(path: str, parts: dict[tuple[int, str, str], torch.Tensor], model_type: str | None) -> dict[str, torch.Tensor]:
    projs = {proj for _, proj, _ in parts}
    names = projection_names(model_type, has_gate=True)
    if names.gate not in projs:
        names = projection_names(model_type, has_gate=False)
    roles = [r for r in (names.gate, names.up, names.down) if r is not None]
    if set(roles) != projs:
        raise RefuseError(f"{path}: expert projections {sorted(projs)} do not match the {model_type} names {roles}")
    num_experts = 1 + max(index for index, _, _ in parts)

    def take(role: str, param: str) -> list[torch.Tensor]:
        out = []
        for e in range(num_experts):
            t = parts.get((e, role, param))
            if t is None:
                raise RefuseError(f"{path}.{e}.{role}.{param} is missing from the checkpoint")
            if param == "weight" and t.dtype != torch.float8_e4m3fn:
                raise RefuseError(f"{path}.{e}.{role}.weight is {t.dtype}, not float8_e4m3fn. {_FP8_FIX}.")
            out.append(t if param == "weight" else t.float())
        return out

    fused = {}
    if names.gate is not None:
        for param, suffix in (("weight", ""), ("weight_scale", "_scale_inv")):
            pairs = zip(take(names.gate, param), take(names.up, param))
            fused[f"{path}.gate_up_proj{suffix}"] = torch.stack([torch.cat(pair, dim=0) for pair in pairs])
    else:
        fused[f"{path}.up_proj"] = torch.stack(take(names.up, "weight"))
        fused[f"{path}.up_proj_scale_inv"] = torch.stack(take(names.up, "weight_scale"))
    fused[f"{path}.down_proj"] = torch.stack(take(names.down, "weight"))
    fused[f"{path}.down_proj_scale_inv"] = torch.stack(take(names.down, "weight_scale"))
    return fused


def _schemes_by_module(tensors: Mapping[str, torch.Tensor], qconfig: Any) -> dict[str, Any]:
    """``{module: scheme}`` for quantized modules of a checkpoint (keys ending in ``weight_scale``)."""
    from compressed_tensors.utils.match import match_name

    schemes = {}
    for key in tensors:
        if not key.endswith(".weight_scale"):
            continue
        module = key[: -len(".weight_scale")]
        for scheme in qconfig.config_groups.values():
            if "Linear" in scheme.targets or any(match_name(module, t) for t in scheme.targets):
                schemes[module] = scheme
                break
    return schemes


def _fp8_fused_tensors(tensors: dict[str, torch.Tensor], qconfig: Any, model_type: str | None) -> tuple[dict, tuple[int, int]]:
    blocks = _expert_blocks(tensors)
    shapes = {
        key[: -len(".weight")]: tuple(t.shape)
        for key, t in tensors.items()
        if (m := _EXPERT_KEY.match(key)) and m["param"] == "weight" and m["proj"] != projection_names(model_type, True).down
    }
    block = check_refusable("fp8_fused", _schemes_by_module(tensors, qconfig), expert_shapes=shapes)
    out: dict[str, torch.Tensor] = {}
    for path, parts in blocks.items():
        out.update(_fuse_fp8_block(path, parts, model_type))
    expert_keys = {f"{path}.{e}.{proj}.{param}" for path, parts in blocks.items() for e, proj, param in parts}
    for key, tensor in tensors.items():
        if key in expert_keys:
            continue
        if key.endswith(".weight_scale") and tensors.get(key[: -len("_scale")], torch.empty(0)).dtype == torch.float8_e4m3fn:
            out[key + "_inv"] = tensor.float()
        elif key.rsplit(".", 1)[-1] in {"input_scale", "weight_zero_point", "input_zero_point", "weight_g_idx"}:
            raise RefuseError(f"{key}: fine-grained FP8 has no such parameter. {_FP8_FIX}.")
        else:
            out[key] = tensor
    return out, block


def _fp8_quantization_config(block: tuple[int, int], ignore: Iterable[str]) -> dict:
    from transformers import FineGrainedFP8Config

    not_convert = sorted({name[3:] if name.startswith("re:") else name for name in ignore} | {"lm_head"})
    config = FineGrainedFP8Config(
        activation_scheme="dynamic", weight_block_size=list(block), modules_to_not_convert=not_convert
    )
    return config.to_dict()


# ----- dequantized -----------------------------------------------------------------------------


def _dequantized_tensors(tensors: dict[str, torch.Tensor], qconfig: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every quantized module's weight dequantized with compressed-tensors' own compressor for its format.

    (``CompressedTensorsDequantizer`` is not used: for float formats it matches every ``*.weight``.)
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationMetadata

    qparams = set(QuantizationMetadata.all_qparam_names())
    out = dict(tensors)
    for module, scheme in _schemes_by_module(tensors, qconfig).items():
        scheme = scheme.model_copy(update={"format": infer_module_format(torch.nn.Linear, scheme)})
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        state = {}
        for name in compressor.compression_param_names(scheme):
            if f"{module}.{name}" in out:
                state[name] = out.pop(f"{module}.{name}")
        for name in [k for k in out if k.startswith(f"{module}.") and k.rpartition(".")[2] in qparams]:
            del out[name]  # activation scales and the like: dropped with the quantization
        out[f"{module}.weight"] = compressor.decompress(state, scheme)["weight"].to(dtype)
    return out


def _save_native(src: Path, dst: Path, dense: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Load per-expert dense tensors into a defused model, re-fuse it, save it with stock Transformers."""
    import transformers
    from transformers import AutoConfig

    from defuser_quant.core import UnsupportedModelError, fuse_model, replace_fused_blocks, restore_fused_blocks

    config = AutoConfig.from_pretrained(src)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    architecture = (getattr(config, "architectures", None) or ["AutoModelForCausalLM"])[0]
    model_cls = getattr(transformers, architecture, transformers.AutoModelForCausalLM)
    try:
        patched = replace_fused_blocks(config.model_type)
    except UnsupportedModelError:
        patched = False
    try:
        with torch.device("meta"):
            model = (model_cls.from_config if model_cls is transformers.AutoModelForCausalLM else model_cls._from_config)(
                config, dtype=dtype
            )
    finally:
        if patched:
            restore_fused_blocks(config.model_type)
    result = model.load_state_dict(dense, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RefuseError(
            f"the dequantized checkpoint does not match {architecture}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if tied:
        model.tie_weights()
    fuse_model(model)
    model.save_pretrained(dst)


# ----- public entry ----------------------------------------------------------------------------


def refuse_checkpoint(
    src: str | Path,
    dst: str | Path,
    mode: RefuseMode = "fp8_fused",
    *,
    side_files_from: Iterable[str | Path] = (),
) -> Path:
    """Write a re-fused copy of the compressed-tensors checkpoint ``src`` into ``dst``.

    Args:
        src: a folder saved by llm-compressor (per-expert ``experts.{e}.{proj}`` keys).
        dst: the output folder (created; files in it are overwritten).
        mode: ``"fp8_fused"`` (Transformers fine-grained FP8, fused ``FP8Experts`` layout) or
            ``"dequantized"`` (plain native fused checkpoint in the model dtype).
        side_files_from: more folders to copy tokenizer and other non-weight files from when
            ``src`` lacks them (``oneshot`` saves the tokenizer after the model).

    Returns:
        ``dst`` as a ``Path``.

    Raises:
        RefuseError: the scheme or the model cannot be re-fused that way (the message names the fix).
    """
    src, dst = Path(src), Path(dst)
    sources = [src, *(Path(p) for p in side_files_from)]
    if mode not in REFUSE_MODES:
        raise RefuseError(f"unknown refuse mode {mode!r}; choose from {REFUSE_MODES}")
    config, qconfig = _load_ct_config(src)
    tensors = _read_tensors(src)
    dst.mkdir(parents=True, exist_ok=True)
    if mode == "fp8_fused":
        model_type = config.get("model_type")
        fused, block = _fp8_fused_tensors(tensors, qconfig, model_type)
        config["quantization_config"] = _fp8_quantization_config(block, qconfig.ignore or [])
        _write_tensors(fused, dst)
        (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _copy_side_files(sources, dst, skip={"config.json", "model.safetensors.index.json", "recipe.yaml"})
    else:
        dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch."))
        dense = _dequantized_tensors(tensors, qconfig, dtype)
        _save_native(src, dst, dense, dtype)
        _copy_side_files(sources, dst, skip=_WRITTEN_BY_SAVE | {"recipe.yaml"})
    logger.info("re-fused %s -> %s (%s)", src, dst, mode)
    return dst
