"""``benchmarks/gil_drops.py``: a worker's waits for a lock whose other holders copy tensors inside it or after it
(the shape of block_finalize's reads of GPTQModel's processed results), and a tensor's deallocation alone and beside
busy threads. Structure only: the timings are the machine's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gil_drops  # noqa: E402


def test_each_placement_runs_in_turns_and_the_result_is_written_whole(tmp_path, capsys):
    out = tmp_path / "lock.json"
    assert gil_drops.main(["--pool", "2", "--busy", "1", "--seconds", "0.2", "--repeat", "1", "--frees", "50",
                           "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [t["placement"] for t in result["turns"]] == list(gil_drops.PLACEMENTS) == ["inside", "after"]
    for turn in result["turns"]:
        assert turn["worker_takes"] > 0 and 0 <= turn["mean_wait_ms"] <= turn["max_wait_ms"]
        assert turn["p90_wait_ms"] <= turn["max_wait_ms"]
    assert [(f["round"], f["busy"], f["frees"]) for f in result["frees"]] == [(0, 0, 50), (0, 1, 50)]
    assert all(f["free_us"] > 0 and f["noop_to_us"] > 0 and f["dict_pop_us"] > 0 for f in result["frees"])
    assert result["pool"] == 2 and result["command"].startswith("python benchmarks/gil_drops.py --pool 2")
    assert not [p for p in tmp_path.iterdir() if p.name != "lock.json"]  # no temporary left beside it
    assert "copies inside the lock" in capsys.readouterr().out


def test_bad_settings_are_one_clear_error():
    with pytest.raises(SystemExit) as exc:
        gil_drops.main(["--seconds", "0"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="placement 'beside'"):
        gil_drops.run("beside", pool=1, busy=0, seconds=0.1, ext_ms=0.5)
