"""``benchmarks/_parallel_warm.py``: the benchmark's JIT extensions built in child processes at once,
beside the parent's own work; a failed build named; children killed when the parent stops early."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _parallel_warm import MARK, timed_wait, warming  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# A stand-in for the benchmark script: ``<name> <folder>``. "a" and "b" each wait (up to 20 s) for the
# other's file to exist, so they finish only if both run at the same time; "bad" fails; "slow" sleeps 20 s, then leaves a file.
CHILD = f'''
import json, sys, time
from pathlib import Path
sys.path.insert(0, {str(BENCHMARKS)!r})
from _parallel_warm import report
name, folder = sys.argv[1], Path(sys.argv[2])
(folder / (name + ".tmp")).write_text(str(__import__("os").getpid()))
(folder / (name + ".tmp")).rename(folder / name)  # whole when it appears: the parent reads it as soon as it exists
if name in ("a", "b"):
    other = folder / ("b" if name == "a" else "a")
    t = time.time()
    while not other.exists():
        if time.time() - t > 20:
            sys.exit("the other build never started")
        time.sleep(0.01)
    print("building", name)
    sys.exit(report((0.5, name == "a")))
if name == "bad":
    print("nvcc fatal: no such file")
    sys.exit(3)
time.sleep(20)
(folder / "slow.finished").write_text("")
'''


@pytest.fixture
def child(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    folder = tmp_path / "marks"
    folder.mkdir()
    return script, folder


def test_the_builds_run_at_the_same_time_beside_the_parents_work(child, capsys):
    script, folder = child
    with warming(script, ["a", "b"], child_args=lambda name: [name, str(folder)]) as wait:
        parent_ran = True  # the parent's own work (the source model) goes here, the children already started
        results, waited = timed_wait(wait)
    assert parent_ran and results == {"a": (0.5, True), "b": (0.5, False)} and waited >= 0
    out = capsys.readouterr().out
    assert "building a" in out and "building b" in out  # each child's output echoed


def test_a_failed_build_is_named_with_its_last_line(child):
    script, folder = child
    with pytest.raises(SystemExit, match=r"building the bad extension failed \(exit 3\): nvcc fatal: no such file"):
        with warming(script, ["bad"], child_args=lambda name: [name, str(folder)]) as wait:
            wait()


def test_children_still_building_are_killed_when_the_parent_stops(child):
    script, folder = child
    with pytest.raises(KeyboardInterrupt):
        with warming(script, ["slow"], child_args=lambda name: [name, str(folder)]):
            t = time.time()
            while not (folder / "slow").exists() and time.time() - t < 30:
                time.sleep(0.01)
            raise KeyboardInterrupt  # Ctrl-C while the source model is built
    pid = int((folder / "slow").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and waited for (no zombie left either)
    assert not (folder / "slow.finished").exists()  # killed, not waited for to the end


def test_the_benchmark_script_builds_one_extension_as_a_child(capsys):
    """The real script's child mode: the CPU packing extension (None where GPTQModel is not installed)."""
    import gptqmodel_gpu as bench

    assert set(bench.WARMERS) == {"gptq", "rows", "pack", "rowpack"}
    assert bench.main(["--warm-extension", "pack"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(MARK)]
    assert len(lines) == 1
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        assert lines[0] == MARK + '{"seconds": null, "available": null}'
    else:
        assert '"available": true' in lines[0]
    from defuser_quant.integrations.gptqmodel import pack_kernel  # the row-wise pack kernel: for -rowpack variants

    assert bench.main(["--warm-extension", "rowpack"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(MARK)]
    assert len(lines) == 1 and f'"available": {"true" if pack_kernel.load() is not None else "false"}' in lines[0]
