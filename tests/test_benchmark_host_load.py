"""``benchmarks/_host_load.py``: how busy the host was beside a benchmark run (other work's cores,
hypervisor steal, the run's own cores, a Python probe), read from ``/proc/stat`` and the children's
CPU time around the run."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _host_load import CpuTimes, host_load, host_markdown, read_cpu_times, summarize  # noqa: E402

PROC_STAT = Path("/proc/stat")
linux_only = pytest.mark.skipif(read_cpu_times() is None, reason="no readable /proc/stat")


def test_proc_stat_is_read_in_seconds_and_counts_the_cpus(tmp_path, monkeypatch):
    import _host_load

    monkeypatch.setattr(_host_load.os, "sysconf", lambda name: 100)
    stat = tmp_path / "stat"
    #                 user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 20 30 500 50 5 5 40 0 0\ncpu0 50 10 15 250 25 2 3 20 0 0\n"
                    "cpu1 50 10 15 250 25 3 2 20 0 0\nintr 1 2 3\nctxt 99\n")
    times = read_cpu_times(str(stat))
    assert times == CpuTimes(busy=1.6, steal=0.4, total=7.5, cpus=2)


@pytest.mark.parametrize("text", ["", "cpu  1 2 3\n", "cpu  a b c d e f g h\n", "intr 1 2\n"])
def test_unreadable_or_odd_proc_stat_gives_none(tmp_path, text):
    stat = tmp_path / "stat"
    stat.write_text(text)
    assert read_cpu_times(str(stat)) is None
    assert read_cpu_times(str(tmp_path / "missing")) is None


def test_the_runs_own_cpu_time_is_taken_out_of_the_machines_busy_time():
    before = CpuTimes(busy=100.0, steal=1.0, total=1000.0, cpus=8)
    after = CpuTimes(busy=130.0, steal=3.0, total=1080.0, cpus=8)  # 10 s of wall on 8 CPUs
    record = summarize(before, after, wall_s=10.0, run_cpu_s=20.0, probe=31.5)
    assert record == {"seconds": 10.0, "probe_ms": 31.5, "run_cores": 2.0, "others_cores": 1.0, "steal_pct": 2.5, "cpus": 8}
    # no /proc/stat: only what the launcher itself knows
    assert summarize(None, after, 10.0, 20.0, 31.5) == {"seconds": 10.0, "probe_ms": 31.5, "run_cores": 2.0,
                                                        "others_cores": None, "steal_pct": None, "cpus": None}
    # jiffy rounding can make the machine's busy time smaller than the run's: never below zero
    assert summarize(before, after, 10.0, 40.0, None)["others_cores"] == 0.0


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"


@linux_only
def test_a_busy_child_counts_as_the_run_and_a_busy_thread_beside_it_as_other_work():
    # CPU seconds, not rates: on a loaded 2-core CI host the same work takes longer wall time
    row: dict = {}
    with host_load(row):
        subprocess.run([sys.executable, "-c", BURN], check=True)
    load = row["host_load"]
    assert load["run_cores"] * load["seconds"] >= 0.5 and load["cpus"] >= 1 and load["probe_ms"] > 0
    assert 0 <= load["others_cores"] <= load["cpus"] and 0 <= load["steal_pct"] <= 100

    spun: list[float] = []

    def spin() -> None:  # the launcher's own thread spins: not the run's CPU time
        t = time.thread_time()
        while time.thread_time() - t < 0.6:
            pass
        spun.append(time.thread_time() - t)

    spinner = threading.Thread(target=spin)
    row = {}
    with host_load(row):
        spinner.start()
        spinner.join()
    load = row["host_load"]
    assert load["others_cores"] * load["seconds"] >= 0.8 * spun[0] and load["run_cores"] * load["seconds"] < 0.1


def test_the_record_is_written_when_the_run_fails():
    row: dict = {}
    with pytest.raises(subprocess.TimeoutExpired):
        with host_load(row):
            subprocess.run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.3)
    assert row["host_load"]["seconds"] >= 0.3 and row["host_load"]["probe_ms"] > 0


def test_the_table_names_each_run_and_shows_missing_figures_as_dashes():
    rows = [{"run": "stock", "host_load": {"others_cores": 1.5, "cpus": 16, "steal_pct": 0.1, "run_cores": 3.2, "probe_ms": 30.1}},
            {"run": "ours", "host_load": {"others_cores": None, "cpus": None, "steal_pct": None, "run_cores": 2.0, "probe_ms": 29.0}},
            {"run": "skipped"}]
    table = host_markdown(rows)
    assert "| stock | 1.5 | 16 | 0.1 | 3.2 | 30.1 |" in table and "| ours | - | - | - | 2.0 | 29.0 |" in table
    assert "skipped" not in table
    assert "| all x1 r2 |" in host_markdown([{"variant": "all", "host_load": rows[0]["host_load"]}], lambda r: "all x1 r2")
    assert host_markdown([{"run": "a"}]) == ""
