"""benchmarks/_gil_probe.py: the interpreter lock's hand-back delay, idle and with a busy thread."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _gil_probe import GilProbe  # noqa: E402


def test_a_busy_thread_delays_the_probe_by_about_the_switch_interval():
    from gil_holders import measure

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.02)
    try:
        with GilProbe() as idle_probe:
            time.sleep(0.4)
        busy = measure(lambda: sum(range(10_000)), 0.4)["probe"]  # pure Python on another thread
    finally:
        sys.setswitchinterval(old)
    # A delay is the time past the asked-for sleep: idle, some wake-ups come back almost at once.
    assert min(idle_probe.delays) < idle_probe.interval / 4
    idle = idle_probe.summary()
    assert idle["samples"] > 20 and busy["samples"] >= 5
    assert busy["switch_interval_ms"] == 20.0
    # Waking from its sleep, the probe waits for the spinning thread to be asked to let go.
    assert busy["p50_ms"] >= 10.0 and busy["mean_ms"] > 3 * idle["mean_ms"]
    assert busy["over_1ms"] > 0.5 and busy["waited_s"] > idle["waited_s"]
    assert set(busy) == set(idle) and busy["p50_ms"] <= busy["p90_ms"] <= busy["p99_ms"] <= busy["max_ms"]


def test_probe_interval_is_checked():
    with pytest.raises(ValueError, match="interval"):
        GilProbe(0)


def test_summary_reads_the_recorded_delays():
    probe = GilProbe(0.001)
    probe.delays = [0.004, 0.0001, 0.002, 0.0003]
    summary = probe.summary()
    assert (summary["samples"], summary["mean_ms"], summary["max_ms"], summary["waited_s"]) == (4, 1.6, 4.0, 0.006)
    assert (summary["p50_ms"], summary["over_1ms"], summary["interval_ms"]) == (2.0, 0.5, 1.0)
    assert GilProbe().summary()["mean_ms"] is None  # nothing sampled: no figures, no error


def test_gil_holders_benchmark_tells_a_lock_holder_from_a_kernel(tmp_path, capsys):
    import json

    import gil_holders

    out = tmp_path / "holders.json"
    assert gil_holders.main(["--seconds", "0.3", "--only", "idle,python_loop,tensor_clone", "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["idle", "python_loop", "tensor_clone"]
    loop, clone = results["python_loop"], results["tensor_clone"]
    assert loop["calls_per_s"] > 0 and clone["calls_per_s"] > 0 and results["idle"]["calls_per_s"] is None
    # A pure-Python loop keeps the lock until asked to let go; a tensor copy lets it go while it runs.
    assert loop["probe"]["p50_ms"] > 2.0 and loop["probe"]["p50_ms"] > 3 * clone["probe"]["p50_ms"]
    with pytest.raises(SystemExit):
        gil_holders.main(["--only", "nope"])
    assert "unknown candidates ['nope']" in capsys.readouterr().err


def test_a_long_wait_for_the_lock_is_kept_with_when_it_happened():
    import threading

    probe = GilProbe(0.001, stall=0.03)
    with probe:
        time.sleep(0.05)
        hold = threading.Event()

        def spin():  # pure Python with a long switch interval: the probe cannot get the lock back
            end = time.perf_counter() + 0.12
            hold.set()
            while time.perf_counter() < end:
                pass

        old = sys.getswitchinterval()
        sys.setswitchinterval(0.1)
        try:
            t = threading.Thread(target=spin)
            t.start()
            hold.wait()
            t.join()
        finally:
            sys.setswitchinterval(old)
        time.sleep(0.05)
    summary = probe.summary()
    assert summary["stalls"] >= 1 and summary["stalled_s"] >= 0.03 and summary["stall_ms"] == 30.0
    a, b = max(probe.stalls, key=lambda s: s[1] - s[0])
    assert b - a >= 0.03 and probe._started < a < b
