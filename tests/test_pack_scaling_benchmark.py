"""``benchmarks/pack_scaling.py``: GPTQModel's CPU pack extension timed per threads and callers, words checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pack_scaling as bench  # noqa: E402
from benchmark_runs import run_main_json  # noqa: E402


@pytest.mark.parametrize("argv,says", [
    (["--threads", "0"], "argument --threads: counts must be >= 1"),
    (["--callers", "x"], "argument --callers: expected comma-separated whole numbers"),
    (["--callers", ","], "--threads and --callers each need at least one count"),
    (["--modules", "0"], "argument --modules: must be >= 1, got 0"),
    (["--packers", "extension,fast"], "argument --packers: unknown or none ['fast']; choose from extension, rows"),
])
def test_bad_flags_are_one_error_line(capsys, argv, says):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_real_run_times_every_combination_and_checks_the_words(tmp_path):
    pytest.importorskip("gptqmodel")
    argv = ["--threads", "1,2", "--callers", "1,2", "--modules", "2", "--repeats", "1", "--scale-down", "8"]
    data = run_main_json(bench, "pack_scaling.py", argv, tmp_path / "pack.json")
    combos = {(r["out"], r["in"], r["threads"], r["callers"]) for r in data["rows"]}
    assert combos == {(o, i, t, c) for o, i in ((128, 256), (256, 128)) for t in (1, 2) for c in (1, 2)}
    assert data["all_same_words"] is True and all(r["same_words"] for r in data["rows"])
    assert all(r["ms_per_module"] > 0 and r["block_in"] % 32 == 0 for r in data["rows"])


def test_words_that_differ_from_gptqmodels_call_fail_the_run(tmp_path, monkeypatch):
    pytest.importorskip("gptqmodel")
    import torch
    from gptqmodel.nn_modules.qlinear import pack_block_ext

    real = pack_block_ext.pack_block_cpu

    def off_by_one_when_split(weight, scales, zeros, g_idx, bits, word_bits, block_in, threads):
        qweight, qzeros = real(weight, scales, zeros, g_idx, bits, word_bits, block_in, threads)
        return (qweight + 1 if threads > 1 else qweight), qzeros

    monkeypatch.setattr(pack_block_ext, "pack_block_cpu", off_by_one_when_split)
    argv = ["--threads", "1,2", "--callers", "1", "--modules", "1", "--repeats", "1", "--scale-down", "8"]
    assert bench.main(argv) == 1
    assert torch.equal(real(*bench._module(128, 256), 4, 32, 8192, 1)[0], real(*bench._module(128, 256), 4, 32, 256, 1)[0])


def test_the_row_kernel_is_timed_beside_the_extension_and_checked_against_its_words(tmp_path, monkeypatch):
    pytest.importorskip("gptqmodel")
    from defuser_quant.integrations.gptqmodel import pack_kernel

    if pack_kernel.load() is None:
        pytest.skip("the pack kernel could not be built here (no C++ compiler)")
    argv = ["--packers", "extension,rows", "--threads", "1,2", "--callers", "1,2", "--modules", "2", "--repeats", "1",
            "--scale-down", "8"]
    data = run_main_json(bench, "pack_scaling.py", argv, tmp_path / "pack.json")
    combos = {(r["packer"], r["out"], r["threads"], r["callers"]) for r in data["rows"]}
    assert combos == ({("extension", o, t, c) for o in (128, 256) for t in (1, 2) for c in (1, 2)}
                      | {("rows", o, 1, c) for o in (128, 256) for c in (1, 2)})  # the kernel: one thread a call
    assert data["all_same_words"] is True and all(r["ms_per_module"] > 0 for r in data["rows"])

    real = pack_kernel.load()
    monkeypatch.setattr(pack_kernel, "load", lambda: lambda *a: (real(*a)[0] + 1, real(*a)[1]))
    assert bench.main(["--packers", "rows", "--callers", "1", "--modules", "1", "--repeats", "1",
                       "--scale-down", "8"]) == 1  # words that differ from GPTQModel's fail the run
    monkeypatch.setattr(pack_kernel, "load", lambda: None)
    with pytest.raises(SystemExit, match="the pack kernel could not be built here"):
        bench.main(["--packers", "rows", "--scale-down", "8"])
