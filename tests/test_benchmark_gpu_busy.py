"""``benchmarks/_profile.py``'s GPU busy summary of a torch profile: the union of the kernels' intervals, the
driver's lazy loads apart, and per stage range how much of its host time the GPU worked."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _profile import gpu_busy_lines  # noqa: E402
from _timeline import covered_seconds, merge_spans  # noqa: E402


def _event(name: str, device: str, start_s: float, end_s: float) -> SimpleNamespace:
    return SimpleNamespace(name=name, device_type=f"DeviceType.{device}",
                           time_range=SimpleNamespace(start=start_s * 1e6, end=end_s * 1e6))


def test_spans_merge_and_cover_windows():
    merged = merge_spans([(3.0, 4.0), (0.0, 1.0), (0.5, 2.0), (5.0, 5.0)])
    assert merged == [(0.0, 2.0), (3.0, 4.0)]
    assert covered_seconds(merged, 1.0, 3.5) == pytest.approx(1.5)
    assert covered_seconds(merged, -1.0, 10.0) == pytest.approx(3.0)
    assert covered_seconds(merged, 2.0, 3.0) == 0.0


def test_busy_lines_count_kernels_once_and_leave_loads_and_annotations_out():
    events = [
        _event("stage:calibrate_forward", "CPU", 0.0, 4.0),
        _event("stage:solve", "CPU", 4.0, 6.0),
        _event("stage:calibrate_forward", "CUDA", 0.0, 4.0),  # the GPU-side annotation: not work
        _event("aten::mm", "CPU", 0.0, 0.5),
        _event("gemm", "CUDA", 0.5, 1.5),
        _event("gemm", "CUDA", 1.0, 2.0),  # overlaps the first: counted once
        _event("Lazy Function Loading", "CUDA", 2.0, 2.016),
        _event("Runtime Triggered Module Loading", "CPU", 2.1, 2.13),  # a host event counts too
        _event("potrf", "CUDA", 4.5, 6.0),
    ]
    lines = gpu_busy_lines(events)
    assert lines[0] == "GPU busy 3.00 s (union of 3 kernels and copies); lazy kernel loads 2, 0.05 s"
    assert "stage:calibrate_forward: host 4.00 s, GPU busy 1.50 s (38%)" in lines
    assert "stage:solve: host 2.00 s, GPU busy 1.50 s (75%)" in lines
