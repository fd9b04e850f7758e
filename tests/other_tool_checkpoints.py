"""Quantized MoE checkpoints written by other tools than GPTQModel or the job runner, made once per session.

* ``llmcompressor_awq``: stock llm-compressor 0.14 AWQ (``AWQModifier`` + ``W4A16_ASYM``, group 128) of
  the shipped tiny qwen3_moe, llm-compressor linearizing the experts by itself: compressed-tensors
  pack-quantized with ``weight_zero_point``. Its in-memory logits are saved next to it.
* ``autoawq_style``: GPTQModel's AWQ (GEMM) checkpoint, whose tensors are AutoAWQ's GEMM layout
  (``qweight/qzeros/scales``), with AutoAWQ's ``quantization_config`` (``version: gemm``,
  ``zero_point``, ``modules_to_not_convert``) instead of GPTQModel's.
* ``llmcompressor_irregular``: a tiny irregular family (dbrx, granitemoe) quantized data-free by
  llm-compressor (``W4A16`` int4 group 32) behind our ``DefuseModifier``; ``inmemory_logits.pt`` holds
  the quantized model's logits on ``IDS[:, :16]``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from quantized_checkpoints import quantized_checkpoint

_MADE: dict[str, Path] = {}
IDS = torch.arange(1, 33).unsqueeze(0)


def _corpus_rows(count: int = 8) -> list[str]:
    from defuser_quant.assets import TINY_MOE_PATH

    lines = [line for line in (Path(TINY_MOE_PATH).parent / "corpus" / "train.txt").read_text().splitlines() if line.strip()]
    return [" ".join(lines[i * 12 : (i + 1) * 12]) for i in range(count)]


def llmcompressor_awq(base: Path) -> Path:
    """Stock llm-compressor AWQ W4A16_ASYM of the tiny model; ``inmemory_logits.pt`` holds its logits on ``IDS``."""
    if "awq" not in _MADE:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        from defuser_quant.assets import TINY_MOE_PATH

        out = base / "llmcompressor-awq-asym"
        pin = IntermediatesCache.pin_memory
        if not torch.accelerator.is_available():  # llm-compressor 0.14 AWQ pins memory, which needs an accelerator
            IntermediatesCache.pin_memory = lambda self, *a, **k: None
        try:  # n_grid=3: a coarser scale search than the default 20 (3.5x faster here), the same stock format
            model = oneshot(
                model=str(TINY_MOE_PATH), dataset=Dataset.from_dict({"text": _corpus_rows()}),
                recipe=[AWQModifier(n_grid=3), QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head", "re:.*mlp.gate$"])],
                output_dir=str(out), num_calibration_samples=8, max_seq_length=64, shuffle_calibration_samples=False,
            )
        finally:
            IntermediatesCache.pin_memory = pin
        with torch.no_grad():
            torch.save(model(input_ids=IDS).logits.float(), out / "inmemory_logits.pt")
        _MADE["awq"] = out
    return _MADE["awq"]


def autoawq_style(base: Path, not_convert: list[str] | None = None) -> Path:
    """GPTQModel's AWQ GEMM checkpoint re-labelled with AutoAWQ's ``quantization_config``."""
    key = f"autoawq-{not_convert}"
    if key not in _MADE:
        src = quantized_checkpoint("gptqmodel", base, method="awq")
        out = base / f"autoawq-style-{len(_MADE)}"
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("job.json", "logs", "*.png", "coverage*"))
        config = json.loads((out / "config.json").read_text())
        gptqmodel = config["quantization_config"]
        config["quantization_config"] = {
            "quant_method": "awq", "bits": gptqmodel["bits"], "group_size": gptqmodel["group_size"], "zero_point": True,
            "version": "gemm", "modules_to_not_convert": not_convert,
        }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        _MADE[key] = out
    return _MADE[key]


def llmcompressor_irregular(family: str, base: Path) -> Path:
    """A tiny ``family`` model (tests/model_zoo.py) quantized data-free by llm-compressor behind DefuseModifier."""
    if family not in _MADE:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier

        import defuser_quant.integrations.llmcompressor as dq_llmc
        from model_zoo import build_tiny_model

        model, _ = build_tiny_model(family)
        float_dir, out = base / f"{family}-float", base / f"{family}-w4g32"
        model.save_pretrained(float_dir)
        scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}
        ignore = ["lm_head", "re:.*mlp.gate$", "re:.*router.*"]
        quantized = oneshot(model=str(float_dir), recipe=[dq_llmc.DefuseModifier(), QuantizationModifier(
            config_groups={"group_0": scheme}, ignore=ignore)], output_dir=str(out))
        with torch.no_grad():
            torch.save(quantized(input_ids=IDS[:, :16]).logits.float(), out / "inmemory_logits.pt")
        _MADE[family] = out
    return _MADE[family]
