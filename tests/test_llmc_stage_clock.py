"""``benchmarks/_llmc_stages.StageClock``: the stages a thread is inside, so that a moment of ``oneshot`` (a full
garbage collection in ``distributed_gpu.py``'s ``gc_full.by_stage``) is put down to the top-level stage it came in."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _llmc_stages import StageClock  # noqa: E402


def test_the_open_stages_follow_the_thread_and_the_top_level_one_is_named():
    clock = StageClock(cuda=False)
    assert clock.open_stages() == () and clock.top_level_stage() == "outside the stages"
    seen: list = []
    with clock.stage("experts_host"):  # not a top-level stage: named only while no top-level one is open
        assert clock.top_level_stage() == "experts_host"
    with clock.stage("calibrate_forward"):
        with clock.stage("experts_host"):
            assert clock.open_stages() == ("calibrate_forward", "experts_host")
            assert clock.top_level_stage() == "calibrate_forward"
            thread = threading.Thread(target=lambda: seen.append(clock.top_level_stage()))
            thread.start()
            thread.join()
    assert seen == ["outside the stages"]  # another thread is in none of this thread's stages
    assert clock.open_stages() == () and clock.calls["experts_host"] == 2


def test_a_stage_left_by_an_exception_is_closed():
    clock = StageClock(cuda=False)
    with pytest.raises(KeyboardInterrupt):
        with clock.stage("save"):
            raise KeyboardInterrupt
    assert clock.open_stages() == () and clock.calls["save"] == 1
