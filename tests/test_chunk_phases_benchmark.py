"""benchmarks/chunk_phases.py on the CPU: its flags, and a real (tiny) run's report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import chunk_phases  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_bad_flags_are_refused_with_what_is_wrong(capsys):
    for argv, says in ((["--shapes", "768x2048"], "rows x columns x modules"),
                       (["--shapes", "64x100x2"], "multiple of 128"),
                       (["--busy", "1,x"], "comma-separated"),
                       (["--repeats", "0"], "must be >= 1")):
        with pytest.raises(SystemExit):
            chunk_phases.parse_args(["--device", "cpu", *argv])
        assert says in capsys.readouterr().err


def test_a_tiny_cpu_run_reports_every_phase_of_a_real_batched_solve(tmp_path):
    out = tmp_path / "phases.json"
    assert chunk_phases.main(["--device", "cpu", "--shapes", "64x256x3", "--tokens", "96", "--repeats", "1",
                              "--busy", "0", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["meta"]["device"] == "cpu"
    (row,) = report["rows"]
    assert (row["rows"], row["columns"], row["modules"], row["path"]) == (64, 256, 3, "batched_torch@cpu")
    phases = row["phases"]
    # the wrapped phases ran as often as the solve calls them: one finalization per module, one
    # inverse step per chunk, quantizer parameters once for the rows and once per group of 128 columns
    assert phases["finalize_hessian"]["calls"] == 3 and phases["inverses"]["calls"] == 1
    assert phases["quantizer_params"]["calls"] == 1 + 256 // 128
    timed = sum(p["seconds"] for name, p in phases.items() if not name.startswith("rest"))
    assert 0 < timed <= row["phased_s"] and row["alone_s"] > 0 and row["busy0_s"] > 0
    assert row["per_module_s"] > 0
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, nothing left behind


def test_shared_pairs_are_solved_as_gptqmodels_gate_up_pairs(tmp_path):
    """``--share 2``: pairs of tasks see one input and hold one GPTQModel shared-Hessian cache, so
    the batched solve groups them as a gate/up pair (one inverse per pair), and the run reports it."""
    from defuser_quant.integrations.gptqmodel import batched

    tasks = chunk_phases.make_tasks(64, 256, 4, 96, "cpu", share=2)
    units = batched._units(tasks)
    assert [len(u.tasks) for u in units] == [2, 2]
    assert tasks[0]._shared_hessian_cache is tasks[1]._shared_hessian_cache is not tasks[2]._shared_hessian_cache
    assert all(u is not None for u in batched.batched_gptq_solve(tasks))
    out = tmp_path / "shared.json"
    assert chunk_phases.main(["--device", "cpu", "--shapes", "64x256x4", "--tokens", "96", "--repeats", "1",
                              "--busy", "0", "--share", "2", "--output", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["share"] == 2 and row["per_module_s"] > 0
