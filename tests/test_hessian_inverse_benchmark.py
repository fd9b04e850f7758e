"""benchmarks/hessian_inverse_gpu.py's bookkeeping: the inverse chain is GPTQModel's, and the
comparison counts bit-equal matrices per run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hessian_inverse_gpu as bench  # noqa: E402


def _hessians() -> list[torch.Tensor]:
    return bench.hessians(bench.parse_args(["--device", "cpu", "--experts", "3", "--hidden", "48", "--intermediate",
                                            "16", "--rows", "8", "--layers", "1"]))


def test_the_chain_is_gptqmodels_first_attempt():
    H = _hessians()[0]
    damped = H.clone()
    damped.diagonal().add_(0.05 * torch.mean(H.diagonal()))
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    got = bench.invert(H, 0.05)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.equal(got, got.triu())  # the upper factor GPTQ's block update reads
    assert torch.equal(H, _hessians()[0])  # the input is not changed


def test_comparison_counts_matrices_and_runs():
    hs = _hessians()
    ref = bench.serial(hs, 0.05)
    off = [m.clone() for m in ref]
    off[1][0, 0] += 1e-3 * off[1][0, 0]
    result = bench.compare(ref, [ref, off])
    assert result["bit_equal"] == f"{len(hs) - 1}/{len(hs)}" and result["runs_bit_equal"] == "1/2"
    assert 0 < result["max_rel_diff"] < 1e-2
    batched = bench.compare(ref, [bench.batched(hs, 0.05)])
    assert batched["max_rel_diff"] < 1e-4


def test_stream_and_thread_counts_are_checked(capsys):
    assert bench.parse_args(["--streams", "2,4", "--threads", ""]).streams == [2, 4]
    assert bench.parse_args(["--threads", ""]).threads == []
    for bad in (["--streams", "x"], ["--threads", "0"], ["--streams", "2,-1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert "counts must be >= 1" in capsys.readouterr().err
