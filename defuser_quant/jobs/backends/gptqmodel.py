"""GPTQModel backend: our loader plugin installed, ``quantize_with_defuser``, ``model.save``."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..checkpoint_facts import expert_projection_counts
from ..context import BackendResult, JobContext

logger = logging.getLogger(__name__)
_BITS = {"W4A16": 4, "W8A16": 8}


def bookkeeping_note(stats: Any) -> str:
    """One report line on the lean per-module bookkeeping: what it skipped, and any part left stock."""
    line = (f"GPTQModel bookkeeping: lean path for {stats.materialize_fast} module load(s) and {stats.offload_fast} "
            f"offload(s); {stats.recopy_skipped} second checkpoint copy(ies) skipped; {stats.layer_reads.layers} layer "
            f"load(s) from host reads ({stats.layer_reads.read_ahead} read ahead)")
    if stats.disabled:
        line += "; left stock: " + "; ".join(f"{part} ({why})" for part, why in sorted(stats.disabled.items()))
    return line


def run(ctx: JobContext) -> BackendResult:
    """Evaluate the float model, then load through GPTQModel, quantize, save into staging.

    The plugin is installed for the run and uninstalled afterwards if it was not installed before.
    """
    from defuser_quant.integrations import gptqmodel as plugin

    was_installed = plugin.is_installed()
    plugin.install()
    try:
        with _logs_into(ctx.staging_dir / "logs"):
            return _run(ctx)
    finally:
        if not was_installed:
            plugin.uninstall()


@contextlib.contextmanager
def _logs_into(folder: Path) -> Iterator[None]:
    """GPTQModel 7.6 writes per-processor logs to ``./logs`` (a module constant): put them in
    the job's output instead of the current folder."""
    from gptqmodel.looper import loop_processor

    original = loop_processor._PROJECT_LOG_DIR
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = original


def _forget_scratch_path(folder: Path) -> None:
    """GPTQModel records its offload scratch folder (a fresh temporary path, deleted after the
    run) in the saved configs; written as null, the same job gives the same bytes."""
    for name in ("config.json", "quantize_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        if _null_key(data, "offload_to_disk_path"):
            path.write_text(json.dumps(data, indent=2) + "\n")


def _null_key(node: object, key: str) -> bool:
    """Set every ``key`` in nested dicts to None; True if one held a value."""
    changed = False
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and v is not None:
                node[k] = None
                changed = True
            else:
                changed |= _null_key(v, key)
    return changed


def dynamic_from_ignore(ignore: list[str]) -> dict[str, dict]:
    """``quantization.ignore`` (llm-compressor syntax) as GPTQModel ``dynamic`` negative rules.

    ``re:PATTERN`` stays a regex; a plain entry is an exact module name. GPTQModel matches
    rules with ``re.match`` on the module path, as llm-compressor does.
    """
    rules: dict[str, dict] = {}
    for entry in ignore:
        pattern = entry[3:] if entry.startswith("re:") else re.escape(entry) + "$"
        rules[f"-:{pattern}"] = {}
    return rules


def _run(ctx: JobContext) -> BackendResult:
    from transformers import AutoModelForCausalLM

    from defuser_quant.calibration.data import to_gptqmodel_examples
    from defuser_quant.integrations import gptqmodel as plugin
    from defuser_quant.integrations.gptqmodel.refuse import save_dequantized_fused
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    cfg = ctx.config
    result = BackendResult()
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.evaluation.enabled:
        with ctx.stage("evaluate (float)"):
            float_model = AutoModelForCausalLM.from_pretrained(ctx.model_path, dtype=dtype).to(cfg.model.device).eval()
            result.ppl_before = ctx.evaluate(float_model)
            del float_model
            gc.collect()
    q = cfg.quantization
    qcfg = QuantizeConfig(
        bits=_BITS[q.scheme], group_size=q.effective_group_size, method=q.method, dynamic=dynamic_from_ignore(q.ignore) or None
    )
    with ctx.stage("load + defuse"):
        model = GPTQModel.load(ctx.model_path, qcfg, dtype=dtype)
    cpu_awq = q.method == "awq" and not torch.cuda.is_available()
    with ctx.stage("calibrate + quantize"), ctx.track_layers(model.model):
        quantized = plugin.quantize_with_defuser(
            model,
            to_gptqmodel_examples(ctx.calibration_samples),
            routing=cfg.calibration.routing,
            min_tokens=cfg.calibration.min_tokens,
            policy=cfg.calibration.policy,
            coverage_report=ctx.staging_dir / "coverage.json",
            grouped=True,  # the experts' calibration forward as grouped GEMMs: same rows for every hook
            batched_solve=q.method == "gptq",  # a layer's experts solved together: same checkpoint as per module
            batch_size=4,
            **({"backend": BACKEND.AWQ_TORCH} if cpu_awq else {}),
        )
    result.coverage = quantized.coverage
    if quantized.solve is not None:
        solve = quantized.solve
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(solve.per_module.items()))
        result.notes.append(
            f"GPTQ solve: {solve.batched_modules} module(s) solved batched with their equal-shape siblings, "
            f"{sum(solve.per_module.values())} by GPTQModel per module" + (f" ({reasons})" if reasons else "")
        )
    if quantized.bookkeeping is not None:
        result.notes.append(bookkeeping_note(quantized.bookkeeping))
    with ctx.stage("save"):
        model.save(str(ctx.staging_dir))
        _forget_scratch_path(ctx.staging_dir)
        if cfg.output.layout == "fused-dequantized":
            # from the saved checkpoint (reloaded on CPU with GPTQModel's torch kernels)
            save_dequantized_fused(str(ctx.staging_dir), ctx.staging_dir / "fused-dequantized")
            result.extra_outputs["fused-dequantized"] = "fused-dequantized"
    del model
    gc.collect()
    if cfg.evaluation.enabled:
        # The checkpoint as users get it (the in-memory model is partly offloaded to disk by now).
        with ctx.stage("evaluate (quantized)"):
            reloaded = GPTQModel.load(str(ctx.staging_dir), device=cfg.model.device)
            result.ppl_after = ctx.evaluate(reloaded.model)
    result.expert_projections, result.expert_projections_quantized = expert_projection_counts(ctx.staging_dir)
    return result
