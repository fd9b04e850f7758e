"""``benchmarks/lock_copies.py``: a worker's waits for a lock whose other holders copy tensors inside it or after it
(the shape of block_finalize's reads of GPTQModel's processed results). Structure only: the timings are the
machine's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lock_copies  # noqa: E402


def test_each_placement_runs_in_turns_and_the_result_is_written_whole(tmp_path, capsys):
    out = tmp_path / "lock.json"
    assert lock_copies.main(["--pool", "2", "--busy", "1", "--seconds", "0.2", "--repeat", "1",
                             "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [t["placement"] for t in result["turns"]] == list(lock_copies.PLACEMENTS) == ["inside", "after"]
    for turn in result["turns"]:
        assert turn["worker_takes"] > 0 and 0 <= turn["mean_wait_ms"] <= turn["max_wait_ms"]
        assert turn["p90_wait_ms"] <= turn["max_wait_ms"]
    assert result["pool"] == 2 and result["command"].startswith("python benchmarks/lock_copies.py --pool 2")
    assert not [p for p in tmp_path.iterdir() if p.name != "lock.json"]  # no temporary left beside it
    assert "copies inside the lock" in capsys.readouterr().out


def test_bad_settings_are_one_clear_error():
    with pytest.raises(SystemExit) as exc:
        lock_copies.main(["--seconds", "0"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="placement 'beside'"):
        lock_copies.run("beside", pool=1, busy=0, seconds=0.1, ext_ms=0.5)
