"""The job file schema: pydantic models whose errors name the field and the allowed values."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..core.errors import DefuserQuantError

# Imported at module level on purpose: the data config is the calibration layer's own schema.
from defuser_quant.calibration.data import CalibrationDataConfig  # noqa: E402

Backend = Literal["gptqmodel", "llmcompressor"]
Method = Literal["gptq", "awq", "rtn"]
Scheme = Literal["W4A16", "W8A16", "FP8_DYNAMIC", "FP8_BLOCK"]

#: What each backend can do: backend -> method -> schemes.
SUPPORTED: dict[str, dict[str, tuple[str, ...]]] = {
    "gptqmodel": {"gptq": ("W4A16", "W8A16"), "awq": ("W4A16",)},
    "llmcompressor": {"gptq": ("W4A16", "W8A16"), "awq": ("W4A16",), "rtn": ("W4A16", "W8A16", "FP8_DYNAMIC", "FP8_BLOCK")},
}


class JobConfigError(DefuserQuantError, ValueError):
    """A job file is missing, unreadable or invalid; the message names each offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    """The model to quantize."""

    path: str = Field(description="Local folder, or a hub id where a hub is reachable.")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = Field(default="cpu", description="cpu, cuda, cuda:N")
    trust_remote_code: bool = False


class QuantizationSection(_Strict):
    """Which quantizer and what it produces."""

    backend: Backend = "llmcompressor"
    method: Method = "gptq"
    scheme: Scheme = "W4A16"
    group_size: int = Field(default=128, gt=0)
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"],
        description="Modules left in float (llm-compressor syntax; 're:' prefixes a regex).",
    )

    @model_validator(mode="after")
    def _check_combination(self) -> QuantizationSection:
        methods = SUPPORTED[self.backend]
        if self.method not in methods:
            raise ValueError(
                f"method {self.method!r} is not available with backend {self.backend!r}; allowed: {', '.join(methods)}"
            )
        if self.scheme not in methods[self.method]:
            raise ValueError(
                f"scheme {self.scheme!r} is not available for {self.backend}/{self.method}; "
                f"allowed: {', '.join(methods[self.method])}"
            )
        return self


class CalibrationSection(_Strict):
    """Calibration data and how tokens reach the experts."""

    data: CalibrationDataConfig = Field(default_factory=lambda: CalibrationDataConfig(num_samples=64, seq_len=256))
    routing: Literal["routed", "all", "budgeted"] = Field(
        default="all", description="routed: top-k only; all: every token through every expert; budgeted: top up experts under min_tokens"
    )
    min_tokens: int = Field(default=128, gt=0, description="Coverage threshold per expert.")
    policy: Literal["error", "warn", "fallback"] = Field(
        default="warn", description="What to do about experts still under min_tokens after calibration."
    )


class DefuseSection(_Strict):
    """Which fused blocks to defuse."""

    filter: list[str] = Field(default_factory=list, description="'+:regex' include, '-:regex' exclude, bare = include.")


class OutputSection(_Strict):
    """Where and how the result is written."""

    dir: str = Field(description="Output folder; must be empty or missing unless overwrite is set.")
    layout: Literal["per-expert", "fused-dequantized"] = Field(
        default="per-expert",
        description="per-expert: the quantizer's checkpoint; fused-dequantized: also a float fused checkpoint in <dir>/fused-dequantized.",
    )
    overwrite: bool = False


class EvaluationSection(_Strict):
    """Perplexity on held-out text before and after quantization."""

    enabled: bool = True
    data: CalibrationDataConfig = Field(
        default_factory=lambda: CalibrationDataConfig(split="heldout", num_samples=16, seq_len=256, shuffle=False)
    )


class JobConfig(_Strict):
    """A whole calibration/quantization job."""

    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    defuse: DefuseSection = Field(default_factory=DefuseSection)
    output: OutputSection
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)


def _format(exc: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {exc.error_count()} problem(s) in the job file"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see docs/cli.md for the schema)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        got = err.get("input")
        shown = "" if err["type"] in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {where}: {msg}{shown}")
    return "\n".join(lines)


def parse_job_config(data: Any, origin: str = "job") -> JobConfig:
    """Validate a mapping; raises ``JobConfigError`` naming every offending field."""
    if not isinstance(data, dict):
        raise JobConfigError(f"{origin}: the job file must be a YAML mapping, got {type(data).__name__}")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise JobConfigError(_format(exc, origin)) from None


def load_job_config(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read and validate a YAML job file (``overrides`` are merged in, dotted keys allowed)."""
    path = Path(path)
    if not path.is_file():
        raise JobConfigError(f"job file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise JobConfigError(f"{path}: not valid YAML: {exc}") from None
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_job_config(data, str(path))
