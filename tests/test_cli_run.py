"""`defuser-quant run`: the embedded default job end to end, schema errors, safe output writing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from defuser_quant.cli import main
from defuser_quant.cli.run import DEFAULT_JOB
from defuser_quant.jobs.config import JobConfigError, load_job_config, parse_job_config

REPO = Path(__file__).resolve().parents[1]


def test_packaged_default_job_is_the_configs_default():
    assert DEFAULT_JOB.read_text() == (REPO / "configs" / "default.yaml").read_text()
    config = load_job_config(DEFAULT_JOB)
    assert config.model.path == "builtin:tiny-qwen3-moe"


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"quantization": {"scheme": "W3A16"}}, "quantization.scheme: Input should be 'W4A16', 'W8A16', 'FP8_DYNAMIC' or 'FP8_BLOCK' (got 'W3A16')"),
        ({"quantization": {"backend": "gptqmodel", "method": "rtn"}}, "method 'rtn' is not available with backend 'gptqmodel'; allowed: gptq, awq"),
        ({"calibration": {"routing": "everything"}}, "calibration.routing: Input should be 'routed', 'all' or 'budgeted'"),
        ({"calibration": {"data": {"seq_len": 0}}}, "calibration.data.seq_len: Input should be greater than 0"),
        ({"outptu": {"dir": "x"}}, "outptu: unknown field"),
    ],
)
def test_schema_errors_name_the_field_and_allowed_values(patch, expected):
    data = yaml.safe_load(DEFAULT_JOB.read_text())
    for section, values in patch.items():
        if isinstance(data.get(section), dict):
            for key, value in values.items():
                if isinstance(value, dict):
                    data[section][key].update(value)
                else:
                    data[section][key] = value
        else:
            data[section] = values
    with pytest.raises(JobConfigError) as info:
        parse_job_config(data, "job.yaml")
    assert expected in str(info.value)


def test_missing_output_dir_is_reported():
    with pytest.raises(JobConfigError, match="output: required field is missing"):
        parse_job_config({"model": {"path": "x"}}, "job.yaml")


def test_cli_reports_schema_errors_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "job.yaml"
    bad.write_text("model: {path: x, dtype: fp4}\noutput: {dir: out}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.dtype" in err and "'bfloat16', 'float16' or 'float32'" in err


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_non_empty_output_is_refused_and_kept(tmp_path, capsys, flags):
    """Not an earlier job's output (no job.json): refused even with --overwrite."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["run", "--output", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert "not empty and holds no job.json" in err and "choose an empty or new folder" in err
    assert (out / "precious.txt").read_text() == "keep me"


def test_default_job_never_replaces_an_earlier_output_unasked(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.json").write_text("{}")
    assert main(["run", "--output", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "job.json").read_text() == "{}"


def test_current_folder_is_never_the_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.json").write_text("{}")
    assert main(["run", "-o", ".", "--overwrite"]) == 2
    assert "is the current folder" in capsys.readouterr().err
    assert (tmp_path / "job.json").exists()


def test_interrupted_job_leaves_no_output(tmp_path, monkeypatch, capsys):
    from defuser_quant.jobs.backends import llmcompressor as backend

    def broken(ctx):
        (ctx.staging_dir / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(backend, "run", broken)
    assert main(["run", "--output", str(tmp_path / "out")]) == 130
    assert "run: error: interrupted, nothing written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no stray partial folder either


@pytest.mark.slow
def test_default_job_end_to_end(tmp_path):
    out = tmp_path / "default"
    result = subprocess.run(
        [sys.executable, "-m", "defuser_quant", "run", "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job = json.loads((out / "job.json").read_text())
    assert job["experts"]["projections"] == job["experts"]["quantized"] > 0
    assert job["coverage"]["experts_under_threshold"] == 0
    before, after = job["perplexity"]["before"], job["perplexity"]["after"]
    assert 1 < before < after * 1.5 and after < before * 1.5  # quantized, still the same model
    assert job["versions"]["transformers"] and job["config"]["quantization"]["scheme"] == "W4A16"
    coverage = json.loads((out / "coverage.json").read_text())
    assert coverage["schema_version"] == 1
    assert (out / "coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.15.down_proj.weight_packed" in keys
    assert "summary" in result.stdout and "192 / 192" in result.stdout
    assert "Failed to load" not in result.stderr  # third-party import noise is silenced


@pytest.mark.slow
def test_gptqmodel_job_with_dequantized_fused_output(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    job = tmp_path / "job.yaml"
    out = tmp_path / "out"
    job.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "builtin:tiny-qwen3-moe"},
                "quantization": {"backend": "gptqmodel", "method": "gptq", "scheme": "W4A16"},
                "calibration": {"data": {"num_samples": 16, "seq_len": 128}, "routing": "budgeted", "min_tokens": 64},
                "output": {"dir": str(out), "layout": "fused-dequantized"},
                "evaluation": {"data": {"split": "heldout", "num_samples": 4, "seq_len": 128, "shuffle": False}},
            }
        )
    )
    assert main(["run", str(job)]) == 0
    report = json.loads((out / "job.json").read_text())
    assert report["experts"]["projections"] == report["experts"]["quantized"] == 192
    assert report["coverage"]["experts_under_threshold"] == 0
    assert report["perplexity"]["after"] < 1.5 * report["perplexity"]["before"]
    solve = next(n for n in report["notes"] if n.startswith("GPTQ solve:"))
    assert int(solve.split()[2]) >= 192  # every expert projection went through the batched solve
    kept = next(n for n in report["notes"] if n.startswith("GPTQModel bookkeeping:"))
    assert "192 second checkpoint copy(ies) skipped" in kept and "left stock" not in kept
    fused = AutoModelForCausalLM.from_pretrained(out / "fused-dequantized", dtype=torch.float32)
    assert fused.model.layers[0].mlp.experts.gate_up_proj.shape == (16, 256, 128)


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_job_config(path)
    assert config.output.dir


@pytest.mark.parametrize("flag", [True, False])
def test_deterministic_field_reaches_torch_for_the_run_only(tmp_path, monkeypatch, flag):
    import torch

    from defuser_quant.jobs.backends import llmcompressor as backend

    seen = []

    def record(ctx):
        seen.append(torch.are_deterministic_algorithms_enabled())
        raise KeyboardInterrupt  # stop here; nothing is written

    monkeypatch.setattr(backend, "run", record)
    before = torch.are_deterministic_algorithms_enabled()
    main(["run", "-o", str(tmp_path / "out"), "--set", f"calibration.deterministic={str(flag).lower()}"])
    assert seen == [flag] and torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.slow
def test_llmcompressor_awq_job_end_to_end(tmp_path):
    job = tmp_path / "job.yaml"
    out = tmp_path / "out"
    job.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "builtin:tiny-qwen3-moe"},
                "quantization": {"backend": "llmcompressor", "method": "awq", "scheme": "W4A16"},
                "calibration": {"data": {"num_samples": 8, "seq_len": 64}, "routing": "all"},
                "output": {"dir": str(out)},
                "evaluation": {"data": {"split": "heldout", "num_samples": 2, "seq_len": 64, "shuffle": False}},
            }
        )
    )
    assert main(["run", str(job)]) == 0
    report = json.loads((out / "job.json").read_text())
    assert report["experts"]["projections"] == report["experts"]["quantized"] == 192
    assert report["perplexity"]["after"] < 1.5 * report["perplexity"]["before"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.3.gate_proj.weight_packed" in set(f.keys())


def test_bookkeeping_note_names_every_part_left_stock():
    pytest.importorskip("gptqmodel")
    from defuser_quant.integrations.gptqmodel.overhead import BookkeepingStats
    from defuser_quant.jobs.backends.gptqmodel import bookkeeping_note

    from defuser_quant.integrations.gptqmodel.layer_reads import LayerReadStats

    stats = BookkeepingStats(materialize_fast=3, offload_fast=2, recopy_skipped=1, layer_reads=LayerReadStats(layers=5, read_ahead=4),
                             disabled={"recopy": "rotation set", "offload": "internals differ"})
    assert bookkeeping_note(stats) == ("GPTQModel bookkeeping: lean path for 3 module load(s) and 2 offload(s); 1 second "
                                       "checkpoint copy(ies) skipped; 5 layer load(s) from host reads (4 read ahead); "
                                       "left stock: offload (internals differ); recopy (rotation set)")
