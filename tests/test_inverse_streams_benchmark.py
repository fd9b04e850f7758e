"""benchmarks/inverse_streams.py: the batched solve's Hessian inverses on helper threads and streams (CPU parts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "inverse_streams.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import inverse_streams as bench  # noqa: E402


def _hessians(n: int, columns: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(3 * columns, columns, generator=g)
        out.append(x.T.matmul(x) / x.shape[0])
    return out


def test_error_vs_float64_is_rounding_for_the_serial_inverses_and_large_for_a_wrong_one():
    pytest.importorskip("gptqmodel")
    from gptqmodel import QuantizeConfig

    qcfg = QuantizeConfig(bits=4, group_size=128)
    hessians = _hessians(2, 256)
    inverses = bench._ways(qcfg, 256, 2)["serial"](hessians)
    assert inverses[0].perm is not None  # act_group_aware order: the reference must use the way's own order
    assert bench._error_vs_float64(hessians, inverses, qcfg) < 1e-5
    inverses[1].hinv[3, 7] += 0.05 * float(inverses[1].hinv.abs().max())
    assert bench._error_vs_float64(hessians, inverses, qcfg) > 1e-2


def test_equal_counts_byte_equal_results():
    import torch

    a = [(torch.ones(2, 2), None, torch.zeros(())), (torch.ones(2, 2), torch.arange(2), torch.zeros(()))]
    b = [(torch.ones(2, 2), None, torch.zeros(())), (torch.ones(2, 2), torch.tensor([1, 0]), torch.zeros(()))]
    assert bench._compare(a, a)["all"] == 2 and bench._compare(a, b)["all"] == 1
    parts = bench._compare(a, b)
    assert (parts["hinv"], parts["perm"], parts["info"], parts["max_rel_hinv_diff"]) == (2, 1, 2, 0.0)
    c = [(torch.full((2, 2), 1.5), None, torch.zeros(())), a[1]]
    assert bench._compare(a, c)["hinv"] == 1 and bench._compare(a, c)["max_rel_hinv_diff"] == 0.5


def test_without_cuda_it_says_so_in_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "inverse_streams: needs CUDA (it compares CUDA streams)"


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--threads", "1"])
    assert "--hessians and --threads must be at least 2" in capsys.readouterr().err


def test_settings_are_chosen_in_order_and_unknown_ones_refused(capsys):
    assert bench.parse_args(["--settings", "deterministic, default"]).settings == ["deterministic", "default"]
    assert bench.parse_args([]).settings == list(bench.SETTINGS)
    with pytest.raises(SystemExit):
        bench.parse_args(["--settings", "default,fast"])
    assert "--settings: unknown or none ['fast']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--settings", " , "])
    assert "--settings: unknown or none []; choose from default" in capsys.readouterr().err


def test_the_report_is_complete_only_when_every_asked_setting_ran():
    asked = ["default", "deterministic"]
    partial = bench.report({"command": "x"}, {"default": {}}, asked)
    assert partial["complete"] is False and partial["settings_asked"] == asked and partial["command"] == "x"
    assert bench.report({}, {"default": {}, "deterministic": {}}, asked)["complete"] is True
