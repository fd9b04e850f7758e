"""GPTQModel backend: our loader plugin installed, ``quantize_with_defuser``, ``model.save``."""

from __future__ import annotations

import gc
import logging
import os

import torch

from ..checkpoint_facts import expert_projection_counts
from ..context import BackendResult, JobContext

logger = logging.getLogger(__name__)
_BITS = {"W4A16": 4, "W8A16": 8}


def run(ctx: JobContext) -> BackendResult:
    """Evaluate the float model, then load through GPTQModel, quantize, save into staging.

    The plugin is installed for the run and uninstalled afterwards if it was not installed before.
    """
    from defuser_quant.integrations import gptqmodel as plugin

    was_installed = plugin.is_installed()
    plugin.install()
    try:
        return _run(ctx)
    finally:
        if not was_installed:
            plugin.uninstall()


def _run(ctx: JobContext) -> BackendResult:
    # GPTQModel 7.6 sizes a CPU worker pool from this; with fewer than 2 it refuses to start on
    # small machines ("requests 2 workers but parent 'cpu' only has 1").
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(4, os.cpu_count() or 2))))
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
    qcfg = QuantizeConfig(bits=_BITS[q.scheme], group_size=q.group_size, method=q.method)
    if cfg.defuse.filter:
        result.notes.append("gptqmodel: defuse.filter is applied by GPTQModel's own `dynamic` config, not here")
    with ctx.stage("load + defuse"):
        model = GPTQModel.load(ctx.model_path, qcfg, dtype=dtype)
    cpu_awq = q.method == "awq" and not torch.cuda.is_available()
    with ctx.stage("calibrate + quantize"):
        quantized = plugin.quantize_with_defuser(
            model,
            to_gptqmodel_examples(ctx.calibration_samples),
            routing=cfg.calibration.routing,
            min_tokens=cfg.calibration.min_tokens,
            policy=cfg.calibration.policy,
            coverage_report=ctx.staging_dir / "coverage.json",
            batch_size=4,
            **({"backend": BACKEND.AWQ_TORCH} if cpu_awq else {}),
        )
    result.coverage = quantized.coverage
    with ctx.stage("save"):
        model.save(str(ctx.staging_dir))
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
