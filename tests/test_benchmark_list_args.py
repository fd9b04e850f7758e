"""Benchmark flags parsed by ``benchmarks/_args`` types: lists and counts in, one error line out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gptqmodel_gpu  # noqa: E402
import layer_offload  # noqa: E402
import llmc_grouped_check  # noqa: E402
import quality  # noqa: E402


def test_llmc_grouped_check_modes_are_routing_modes():
    assert llmc_grouped_check.parse_args([]).modes == ["routed", "all"]
    assert llmc_grouped_check.parse_args(["--modes", "all, budgeted"]).modes == ["all", "budgeted"]


def test_quality_backends_are_the_two_backends():
    assert quality.parse_args([]).backends == ["llmcompressor", "gptqmodel"]
    assert quality.parse_args(["--backends", "gptqmodel"]).backends == ["gptqmodel"]


def test_layer_offload_busy_threads_are_counts():
    assert layer_offload.parse_args([]).busy_threads == [0, 4]
    assert layer_offload.parse_args(["--busy-threads", "2,8"]).busy_threads == [2, 8]


@pytest.mark.parametrize("parse,argv,says", [
    (llmc_grouped_check.parse_args, ["--modes", "routed,dense"], "argument --modes: unknown or none ['dense']; choose from routed, all, budgeted"),
    (llmc_grouped_check.parse_args, ["--modes", ","], "argument --modes: unknown or none []"),
    (quality.parse_args, ["--backends", "awq"], "argument --backends: unknown or none ['awq']; choose from gptqmodel, llmcompressor"),
    (layer_offload.parse_args, ["--busy-threads", "0,x"], "argument --busy-threads: expected comma-separated whole numbers"),
    (layer_offload.parse_args, ["--busy-threads", "-1"], "argument --busy-threads: counts must be >= 0"),
    (gptqmodel_gpu.parse_args, ["--repeat", "0"], "argument --repeat: must be >= 1, got 0"),
    (gptqmodel_gpu.parse_args, ["--repeat", "two"], "argument --repeat: expected a whole number, got 'two'"),
    (gptqmodel_gpu.parse_args, ["--repeat", "2", "--gpu-counts", "1,2"], "--repeat runs the variant list again"),
])
def test_bad_lists_are_refused_in_one_line(capsys, parse, argv, says):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1], err
