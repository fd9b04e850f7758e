"""llm-compressor backend: ``oneshot`` with our ``DefuseModifier`` first in the recipe."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ..checkpoint_facts import expert_projection_counts
from ..context import BackendResult, JobContext

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _cpu_awq_workaround(enabled: bool) -> Iterator[None]:
    """llm-compressor 0.14 AWQ pins cached activations unconditionally, which fails on machines
    without an accelerator ("Cannot access accelerator device"). Pinning only matters for
    host-to-GPU copies, so it is switched off for the run when there is no GPU."""
    if not enabled:
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None  # type: ignore[method-assign]
    logger.info("CPU-only run: llm-compressor AWQ activation pinning disabled")
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def _scheme(q) -> dict:
    """The job's scheme as llm-compressor ``config_groups``, with every job field in it
    (a preset name alone would drop ``group_size``)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(q.scheme, ["Linear"])
    if q.effective_group_size is not None:
        scheme = scheme.model_copy(update={"weights": scheme.weights.model_copy(update={"group_size": q.effective_group_size})})
    return {"group_0": scheme}


def _quant_modifiers(cfg) -> list:
    # The transform AWQModifier: ``llmcompressor.modifiers.awq.AWQModifier`` is a deprecated function
    # returning its own empty QuantizationModifier next to the transform, which fails validation.
    from llmcompressor.modifiers.transform import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    q = cfg.quantization
    ignore = list(q.ignore)
    if q.method == "gptq":
        return [GPTQModifier(config_groups=_scheme(q), ignore=ignore)]
    if q.method == "awq":
        return [AWQModifier(), QuantizationModifier(config_groups=_scheme(q), ignore=ignore)]
    return [QuantizationModifier(config_groups=_scheme(q), ignore=ignore)]


def _recipe_points_at_output(staging: Path, output: Path) -> None:
    """``recipe.yaml`` names the staging folder (the coverage report path); name the output."""
    recipe = staging / "recipe.yaml"
    if recipe.is_file():
        recipe.write_text(recipe.read_text().replace(str(staging), str(output)))


def run(ctx: JobContext) -> BackendResult:
    """Load, evaluate, calibrate + quantize with oneshot, save into the staging folder."""
    from transformers import AutoModelForCausalLM

    from defuser_quant.calibration import distributed
    from defuser_quant.calibration.data import to_hf_dataset
    from defuser_quant.integrations.llmcompressor import DefuseModifier
    from defuser_quant.integrations.llmcompressor.compat import check_llmcompressor

    check_llmcompressor()
    from llmcompressor import oneshot

    cfg = ctx.config
    result = BackendResult()
    with ctx.stage("load"):
        model = AutoModelForCausalLM.from_pretrained(
            ctx.model_path, dtype=getattr(torch, cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code
        ).to(cfg.model.device)
        model.eval()
    with ctx.stage("evaluate (float)"):
        result.ppl_before = ctx.evaluate(model)
    defuse = DefuseModifier(
        routing=cfg.calibration.routing,
        min_tokens=cfg.calibration.min_tokens,
        coverage_report=str(ctx.staging_dir / "coverage.json"),
        coverage_policy="warn" if cfg.calibration.policy == "fallback" else cfg.calibration.policy,
        filter=list(cfg.defuse.filter) or None,
        refuse="dequantized" if cfg.output.layout == "fused-dequantized" else False,
        refuse_output_dir=str(ctx.staging_dir / "fused-dequantized") if cfg.output.layout == "fused-dequantized" else None,
    )
    if cfg.calibration.policy == "fallback":
        result.notes.append("llm-compressor: policy 'fallback' runs as 'warn' (use routing: budgeted to top up experts)")
    dataset = distributed.rank_share(to_hf_dataset(ctx.calibration_samples))  # under torchrun: this rank's slice
    needs_data = cfg.quantization.method in ("gptq", "awq")
    with ctx.stage("defuse + calibrate + quantize + save"), ctx.track_layers(model), _cpu_awq_workaround(
        cfg.quantization.method == "awq" and not torch.cuda.is_available()
    ), warnings.catch_warnings():
        if cfg.model.device == "cpu":
            # llm-compressor "offloads" to the CPU the model already lives on; transformers then
            # warns about 50GB shards for any size of model
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        # Our data layer already ordered the samples by the job's seed; llm-compressor's own
        # shuffle draws from the unseeded global RNG, so checkpoints differed run to run.
        kwargs = dict(
            dataset=dataset,
            num_calibration_samples=len(dataset),
            max_seq_length=cfg.calibration.data.seq_len,
            shuffle_calibration_samples=False,
        )
        model = oneshot(
            model=model,
            processor=ctx.tokenizer,
            recipe=[defuse, *_quant_modifiers(cfg)],
            output_dir=str(ctx.staging_dir),
            **(kwargs if needs_data else {}),
        )
    if ctx.output_dir is not None:
        _recipe_points_at_output(ctx.staging_dir, ctx.output_dir)
    with ctx.stage("evaluate (quantized)"):
        result.ppl_after = ctx.evaluate(model)
    result.coverage = defuse.coverage
    result.expert_projections, result.expert_projections_quantized = expert_projection_counts(ctx.staging_dir)
    if cfg.output.layout == "fused-dequantized":
        result.extra_outputs["fused-dequantized"] = "fused-dequantized"
    return result
