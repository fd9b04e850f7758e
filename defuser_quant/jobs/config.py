"""The job file schema: pydantic models whose errors name the field and the allowed values."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.errors import DefuserQuantError, FilterRuleError
from ..core.filters import FilterRules

# Imported at module level on purpose: the data config is the calibration layer's own schema.
from defuser_quant.calibration.data import CalibrationDataConfig  # noqa: E402

Backend = Literal["gptqmodel", "llmcompressor"]
Method = Literal["gptq", "awq", "rtn"]
Scheme = Literal["W4A16", "W8A16", "FP8_DYNAMIC", "FP8_BLOCK"]

#: Where the unknown-field error sends the reader (generated from these models).
SCHEMA_DOC = "docs/job-schema.md"
#: Schemes whose weights are quantized in groups (``group_size`` applies).
GROUPED_SCHEMES = ("W4A16", "W8A16")
DEFAULT_GROUP_SIZE = 128

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

    @field_validator("path")
    @classmethod
    def _non_empty_path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError(f"not a torch device name; use cpu, cuda or cuda:N") from None
        return value


class QuantizationSection(_Strict):
    """Which quantizer and what it produces."""

    backend: Backend = "llmcompressor"
    method: Method = "gptq"
    scheme: Scheme = "W4A16"
    group_size: int | None = Field(
        default=None, gt=0, description=f"Weights per quantization group (W4A16/W8A16 only); unset: {DEFAULT_GROUP_SIZE}."
    )
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
        if self.group_size is not None and self.scheme not in GROUPED_SCHEMES:
            raise ValueError(
                f"group_size applies to {', '.join(GROUPED_SCHEMES)} only, not {self.scheme}; remove it"
            )
        return self

    @property
    def effective_group_size(self) -> int | None:
        """The group size the quantizer gets: the set one, 128 for grouped schemes, else None."""
        if self.scheme not in GROUPED_SCHEMES:
            return None
        return self.group_size or DEFAULT_GROUP_SIZE


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
    deterministic: bool = Field(
        default=False,
        description="Deterministic GPU kernels (torch.use_deterministic_algorithms; slower): same job, same bytes "
        "on a GPU too. The CPU is deterministic without it.",
    )


class DefuseSection(_Strict):
    """Which fused blocks to defuse."""

    filter: list[str] = Field(default_factory=list, description="'+:regex' include, '-:regex' exclude, bare = include.")

    @field_validator("filter")
    @classmethod
    def _valid_rules(cls, value: list[str]) -> list[str]:
        try:
            FilterRules.parse(value)
        except FilterRuleError as exc:
            raise ValueError(str(exc)) from None
        return value


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

    @model_validator(mode="after")
    def _backend_fields(self) -> JobConfig:
        if self.defuse.filter and self.quantization.backend == "gptqmodel":
            raise ValueError(
                "defuse.filter is not available with backend 'gptqmodel' (GPTQModel defuses whole models); "
                "leave modules in float with quantization.ignore instead"
            )
        return self


def _blame(where: str, overrides: dict[str, str]) -> str:
    """The command-line option a field came from, if any (``--set KEY=...``, ``--output``)."""
    for key, option in overrides.items():
        if where == key or where.startswith(key + ".") or key.startswith(where + "."):
            return f" [from {option}]"
    return ""


def _format(exc: ValidationError, origin: str, overrides: dict[str, str] | None = None) -> str:
    errors = exc.errors()
    blamed = [_blame(".".join(str(p) for p in e["loc"]), overrides or {}) for e in errors]
    if blamed and all(blamed):
        head = f"{len(errors)} problem(s) in the command-line overrides of {origin}"
    else:
        head = f"{origin}: {len(errors)} problem(s) in the job file"
    lines = [head]
    for err, blame in zip(errors, blamed):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field (check the spelling; the schema is in {SCHEMA_DOC})"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif got is None and err["type"] in ("model_type", "dict_type"):
            msg = "the section is empty; give its fields or remove it"
        shown = "" if err["type"] in ("missing",) or got is None or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {where}: {msg}{shown}{blame}")
    return "\n".join(lines)


def parse_job_config(data: Any, origin: str = "job", sources: dict[str, str] | None = None) -> JobConfig:
    """Validate a mapping; raises ``JobConfigError`` naming every offending field.

    ``sources`` maps dotted keys to the command-line option that set them, so a mistake there
    is reported as one.
    """
    if not isinstance(data, dict):
        raise JobConfigError(
            f"{origin}: the job file must be a YAML mapping of sections (model:, output:, ...), "
            f"got {type(data).__name__}; see {SCHEMA_DOC}"
        )
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise JobConfigError(_format(exc, origin, sources)) from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise JobConfigError(f"job file {path} does not exist" if not path.exists() else f"job file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise JobConfigError(f"{path}: not a text file (not UTF-8); a job file is YAML, see {SCHEMA_DOC}") from None
    except OSError as exc:
        raise JobConfigError(f"cannot read job file {path}: {exc.strerror}") from None
    if "\x00" in text:
        raise JobConfigError(f"{path}: binary content (NUL bytes); a job file is YAML, see {SCHEMA_DOC}")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JobConfigError(f"{path}: not valid YAML: {exc}") from None


def apply_overrides(data: dict, overrides: dict[str, Any], sources: dict[str, str]) -> None:
    """Merge dotted ``overrides`` into ``data`` in place; a key through a non-section is refused."""
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parents[: depth + 1])
                raise JobConfigError(f"{sources.get(key, key)}: {where} is a value, not a section; check the key")
            node = child
        node[leaf] = value


def load_job_config(
    path: str | Path, overrides: dict[str, Any] | None = None, sources: dict[str, str] | None = None
) -> JobConfig:
    """Read and validate a YAML job file (``overrides`` are merged in, dotted keys allowed).

    ``sources`` names where each override came from (``{"output.dir": "--output"}``); errors
    in an override name it. Overrides without a source are reported as ``--set KEY=VALUE``.
    """
    path = Path(path)
    data = _read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return parse_job_config(data, str(path))
    overrides = overrides or {}
    sources = {key: (sources or {}).get(key, f"--set {key}={value!r}") for key, value in overrides.items()}
    apply_overrides(data, overrides, sources)
    return parse_job_config(data, str(path), sources)
