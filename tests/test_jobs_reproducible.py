"""Every job field reaches the quantizer (read back from the saved checkpoint), and the same job
and seed give a byte-identical checkpoint on the CPU, for both backends (issue 14 items 2, 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from defuser_quant.jobs.config import parse_job_config
from defuser_quant.jobs.runner import run_job

IGNORED = r"re:.*layers\.0\.mlp\.experts\.0\..*"
JOBS = {
    "llmcompressor": {"backend": "llmcompressor", "method": "gptq", "scheme": "W8A16", "group_size": 32},
    "gptqmodel": {"backend": "gptqmodel", "method": "gptq", "scheme": "W4A16", "group_size": 32},
}


def _job(backend: str, out: Path):
    quantization = dict(JOBS[backend], ignore=["lm_head", "re:.*mlp.gate$", IGNORED])
    return parse_job_config(
        {
            "model": {"path": "builtin:tiny-qwen3-moe"},
            "quantization": quantization,
            "calibration": {"data": {"num_samples": 4, "seq_len": 32, "seed": 3}, "routing": "all", "min_tokens": 8},
            "output": {"dir": str(out)},
            "evaluation": {"enabled": False},
        }
    )


def job_dtype(out: Path) -> str:
    return json.loads((out / "job.json").read_text())["config"]["model"]["dtype"]


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.fixture(scope="module", params=sorted(JOBS))
def twice(request, tmp_path_factory):
    """The same job run twice in one process (so global state such as the RNG differs)."""
    root = tmp_path_factory.mktemp(request.param)
    outs = [root / "a", root / "b"]
    cwd = Path.cwd()
    os.chdir(root / "..")  # a clean current folder: nothing may be written into it
    try:
        for out in outs:
            run_job(_job(request.param, out))
    finally:
        os.chdir(cwd)
    return request.param, outs


@pytest.mark.slow
def test_same_job_same_seed_same_bytes(twice):
    _, (a, b) = twice
    first, second = _weights(a), _weights(b)
    assert first and first.keys() == second.keys()
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []
    for name in ("config.json", "quantize_config.json"):  # no run-specific paths or stamps
        if (a / name).exists():
            assert (a / name).read_bytes() == (b / name).read_bytes()


@pytest.mark.slow
def test_every_quantization_field_reaches_the_checkpoint(twice):
    backend, (out, _) = twice
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    job = json.loads((out / "job.json").read_text())["config"]["quantization"]
    keys = _keys(out)
    ignored_expert = "model.layers.0.mlp.experts.0.down_proj"
    quantized_expert = "model.layers.0.mlp.experts.1.down_proj"
    if backend == "llmcompressor":
        (group,) = saved["config_groups"].values()
        assert (group["weights"]["num_bits"], group["weights"]["group_size"]) == (8, 32)
        assert job["group_size"] == 32 and job["scheme"] == "W8A16"
        assert f"{quantized_expert}.weight_packed" in keys
        assert f"{ignored_expert}.weight" in keys and f"{ignored_expert}.weight_packed" not in keys
    else:
        assert (saved["bits"], saved["group_size"], saved["quant_method"]) == (4, 32, "gptq")
        assert any(rule.startswith("-:") and "experts\\.0" in rule for rule in saved["dynamic"])
        assert f"{quantized_expert}.qweight" in keys
        assert f"{ignored_expert}.weight" in keys and f"{ignored_expert}.qweight" not in keys
    assert json.loads((out / "config.json").read_text())["dtype"] == job_dtype(out)
    assert not (out.parent.parent / "logs").exists()  # third-party logs stay in the output
    if backend == "gptqmodel":
        assert any((out / "logs").iterdir())


@pytest.mark.slow
def test_recipe_names_the_output_not_the_staging_folder(twice):
    backend, (out, _) = twice
    if backend != "llmcompressor":
        pytest.skip("only llm-compressor writes recipe.yaml")
    recipe = (out / "recipe.yaml").read_text()
    assert ".partial-" not in recipe and str(out / "coverage.json") in recipe
