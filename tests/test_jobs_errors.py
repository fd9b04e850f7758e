"""Bad input gives one ``defuser-quant <command>: error: ...`` line and exit 2, never a
traceback, and nothing is written (issue 14 item 5)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from defuser_quant.assets import TINY_MOE_PATH
from defuser_quant.cli import main


def _job(tmp_path: Path, **sections) -> Path:
    data = {"model": {"path": "builtin:tiny-qwen3-moe"}, "output": {"dir": str(tmp_path / "out")}}
    data.update(sections)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(autouse=True)
def _no_dataset_bars():
    """In-process, with pytest capturing, a job has no terminal to keep apart from the log, so its
    quiet mode is off (``jobs.quiet``) and ``datasets`` would print its cache-building bar to the
    captured stderr, ahead of the error line, whenever this test is the first in its process to
    read the corpus (the order pytest-xdist gives). A real ``defuser-quant run`` sends that bar to
    the log (test_jobs_quiet.py)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if was:
        datasets.enable_progress_bars()


def _error(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith(f"defuser-quant {argv[0]}: error: "), err
    assert "Traceback" not in err
    return err


def test_binary_job_file(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    assert "not a text file" in _error(capsys, ["run", str(path)])


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_job_file_that_is_not_a_mapping(tmp_path, capsys, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert "must be a YAML mapping of sections" in _error(capsys, ["run", str(path)])


def test_empty_output_section(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("model: {path: builtin:tiny-qwen3-moe}\noutput:\n")
    assert "output: the section is empty" in _error(capsys, ["run", str(path)])


def test_bad_regex_in_defuse_filter_is_refused_when_the_file_is_read(tmp_path, capsys):
    err = _error(capsys, ["run", str(_job(tmp_path, defuse={"filter": ["-:visual("]}))])
    assert "defuse.filter" in err and "not a valid regular expression" in err


def test_device_typo(tmp_path, capsys):
    err = _error(capsys, ["run", str(_job(tmp_path, model={"path": "builtin:tiny-qwen3-moe", "device": "cdua"}))])
    assert "model.device: not a torch device name" in err


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("{tmp}/missing-model", "does not exist as a local folder"),
        ("{tmp}", "has no config.json: not a model folder"),
        ("someorg/somemodel", "the hub cannot be used"),
        ("builtin:nothing", "unknown builtin model"),
    ],
)
def test_model_path_problems(tmp_path, capsys, path, expected):
    job = _job(tmp_path, model={"path": path.format(tmp=tmp_path)})
    assert expected in _error(capsys, ["run", str(job)])
    assert not (tmp_path / "out").exists()


def test_calibration_data_problem_is_an_error_line_and_nothing_is_written(tmp_path, capsys):
    job = _job(tmp_path, calibration={"data": {"source": str(tmp_path / "nowhere.txt")}})
    _error(capsys, ["run", str(job)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_calibration_data_error_is_under_the_package_error_base():
    from defuser_quant.calibration.data import CalibrationDataError
    from defuser_quant.core.errors import DefuserQuantError

    assert issubclass(CalibrationDataError, DefuserQuantError)


def test_set_mistakes_are_reported_as_set_mistakes(capsys, tmp_path):
    err = _error(capsys, ["run", "-o", str(tmp_path / "o"), "--set", "calibration.routing=everything"])
    assert "command-line overrides" in err and "[from --set calibration.routing=everything]" in err
    err = _error(capsys, ["run", "--set", "model.path.x=1"])
    assert "--set model.path.x=1: model.path is a value, not a section" in err
    assert "--set expects KEY=VALUE" in _error(capsys, ["run", "--set", "novalue"])


def test_unknown_field_points_at_the_schema_page(tmp_path, capsys):
    err = _error(capsys, ["run", str(_job(tmp_path, outptu={"dir": "x"}))])
    assert "docs/job-schema.md" in err


def test_group_size_is_refused_where_it_cannot_apply(tmp_path, capsys):
    job = _job(tmp_path, quantization={"method": "rtn", "scheme": "FP8_DYNAMIC", "group_size": 32})
    assert "group_size applies to W4A16, W8A16 only" in _error(capsys, ["run", str(job)])


def test_defuse_filter_is_refused_with_gptqmodel(tmp_path, capsys):
    job = _job(tmp_path, quantization={"backend": "gptqmodel"}, defuse={"filter": ["-:layers\\.0\\."]})
    err = _error(capsys, ["run", str(job)])
    assert "defuse.filter is not available with backend 'gptqmodel'" in err and "quantization.ignore" in err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_full_disk_says_nothing_written(tmp_path, monkeypatch, capsys, code):
    from defuser_quant.jobs.backends import llmcompressor as backend

    def full(ctx):
        (ctx.staging_dir / "model.safetensors").write_bytes(b"half written")
        raise OSError(code, "No space left on device", str(ctx.staging_dir / "model.safetensors"))

    monkeypatch.setattr(backend, "run", full)
    err = _error(capsys, ["run", "-o", str(tmp_path / "out")])
    assert "nothing written" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("model", "expected"),
    [('{"model_type": ', "not a valid JSON file"), ('{"model_type": "nosuchmoe"}', "does not recognize")],
)
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_corrupt_or_unknown_config(tmp_path, capsys, model, expected, command):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text(model)
    argv = ["convert", str(src), str(tmp_path / "dst"), "--to", "fused"] if command == "convert" else ["inspect", str(src)]
    assert expected in _error(capsys, argv)


def test_unreadable_shard_size_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert", str(TINY_MOE_PATH), str(tmp_path / "dst"), "--to", "fused", "--max-shard-size", "abc"])
    assert info.value.code == 2
    assert "cannot read the size 'abc'" in capsys.readouterr().err


def test_broken_pipe_is_quiet(tmp_path):
    """``--json | head``: the reader goes away; no traceback, exit 141 as a SIGPIPE'd tool."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "defuser_quant", "inspect", str(TINY_MOE_PATH), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before it writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_verbose_shows_the_traceback(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("- a\n")
    assert main(["-v", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "run: error:" in err


def test_seq_len_above_max_positions_warns(tmp_path, caplog):
    from defuser_quant.jobs.config import load_job_config
    from defuser_quant.jobs.preflight import preflight

    job = _job(tmp_path, calibration={"data": {"seq_len": 4096}})
    with caplog.at_level("WARNING"):
        checks = preflight(load_job_config(job))
    assert any("seq_len 4096 is above the model's max_position_embeddings 512" in n for n in checks.notes)
    assert "max_position_embeddings" in caplog.text



def test_dense_model_on_the_gptqmodel_backend_is_pointed_the_right_way(tmp_path, capsys):
    import logging

    from transformers import Qwen3Config

    logging.getLogger("transformers").setLevel(logging.ERROR)  # a deprecation notice is not our error line
    model = tmp_path / "dense"
    Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16).save_pretrained(model)
    job = _job(tmp_path, model={"path": str(model)}, quantization={"backend": "gptqmodel"})
    err = _error(capsys, ["run", str(job)])
    assert "has no Mixture-of-Experts blocks" in err and "GPTQModel itself" in err and "backend: llmcompressor" in err


def test_unreachable_hub_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    job = _job(tmp_path, calibration={"data": {"source": "hf:allenai/c4"}})
    err = _error(capsys, ["run", str(job)])
    assert "hub dataset 'allenai/c4' requested but the Hugging Face hub is unreachable" in err
    assert not (tmp_path / "out").exists()
