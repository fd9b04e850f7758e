"""``benchmarks/layer_load.py``: every cell measured (the loops, the busy threads beside them), the JSON kept after
each cell and when the deadline cuts the run short, and a machine without CUDA refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SMALL = ("--device", "cpu", "--tensors", "6", "--rows", "8", "--cols", "16", "--repeats", "2", "--busy", "2")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "layer_load.py"), *args], capture_output=True, text=True,
                          timeout=300)


def test_every_cell_is_timed_and_the_busy_threads_ran(tmp_path):
    out = tmp_path / "load.json"
    done = run(*SMALL, "--output", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    cells = {(c["beside"], c["source"], c["loop"]): c for c in data["cells"]}
    assert set(cells) == {(b, "pageable", k) for b in ("none", "python", "mixed") for k in ("per_tensor", "foreach")}
    assert all(len(c["seconds"]) == 2 and all(t > 0 for t in c["seconds"]) for c in cells.values())
    assert all((c["busy_rounds"] is None) == (c["beside"] == "none") for c in cells.values())
    assert all(c["busy_rounds"] > 0 for c in cells.values() if c["beside"] != "none")
    assert data["bytes"] == 6 * 8 * 16 * 2 and data["skipped"] == [] and "layer_load.py" in data["command"]
    assert [p.name for p in tmp_path.iterdir()] == ["load.json"]  # written whole: no temporary file left beside it


def test_a_deadline_skips_the_rest_and_still_writes(tmp_path):
    out = tmp_path / "load.json"
    done = run(*SMALL, "--deadline", "0", "--output", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["cells"] == [] and len(data["skipped"]) == 6


def test_picked_cells_are_timed_once_per_switch_interval_with_the_interval_set_only_inside(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    import layer_load

    seen: list[int] = []
    real = layer_load.timed
    monkeypatch.setattr(layer_load, "timed",
                        lambda fn, device: seen.append(round(sys.getswitchinterval() * 1e6)) or real(fn, device))
    before = sys.getswitchinterval()
    out = tmp_path / "load.json"
    assert layer_load.main([*SMALL, "--beside", "none,mixed", "--loops", "per_tensor", "--switch-intervals", "5000,200",
                            "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    cells = [(c["beside"], c["source"], c["loop"], c["switch_interval_us"]) for c in data["cells"]]
    assert cells == [(b, "pageable", "per_tensor", us) for b in ("none", "mixed") for us in (5000, 200)]
    assert seen == [5000, 5000, 200, 200] * 2 and sys.getswitchinterval() == before
    assert all(c["busy_rounds"] > 0 for c in data["cells"] if c["beside"] == "mixed")


@pytest.mark.parametrize("flags, message", [
    (("--beside", "mixed,gpu"), "pick one or more of none, python, mixed"),
    (("--switch-intervals", "5000,0"), "whole microseconds >= 1"),
    (("--switch-intervals", "fast"), "whole microseconds >= 1"),
    (("--sources", "pinned"), "measures only pageable"),
])
def test_bad_cell_picks_are_refused_in_one_line(flags, message):
    done = run(*SMALL, *flags)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_the_loops_copy_the_bytes():
    sys.path.insert(0, str(BENCH))
    import layer_load

    flat = torch.arange(4 * 2 * 3 * 2, dtype=torch.uint8)
    sources = layer_load.views(flat, 4, 2, 3)
    assert [s.shape for s in sources] == [torch.Size([2, 3])] * 4
    assert torch.equal(torch.cat([s.reshape(-1).view(torch.uint8) for s in sources]), flat)
    staged, seconds = layer_load.upload(flat, "cpu")
    assert torch.equal(staged, flat) and seconds >= 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_says_so_and_writes_nothing(tmp_path):
    done = run("--output", str(tmp_path / "out.json"))
    assert done.returncode == 1 and "no CUDA device here" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out.json").exists()


def test_ctrl_c_keeps_the_cells_measured_and_says_so(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(BENCH))
    import layer_load

    def interrupted(args, sources, device, result, started):
        result["cells"].append({"beside": "none", "source": "pageable", "loop": "per_tensor", "seconds": [0.1]})
        raise KeyboardInterrupt

    monkeypatch.setattr(layer_load, "measure", interrupted)
    out = tmp_path / "load.json"
    assert layer_load.main([*SMALL, "--output", str(out)]) == 130
    data = json.loads(out.read_text())
    assert data["interrupted"] is True and len(data["cells"]) == 1
    assert "interrupted: 1 cells measured, kept in" in capsys.readouterr().err
