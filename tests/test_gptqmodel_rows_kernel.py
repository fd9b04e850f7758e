"""defuser-quant's one-launch GPTQ block kernel (integrations.gptqmodel.rows_kernel) against
GPTQModel's block-update extension, launch for launch, on the same inputs (CUDA only: run on the
device machine), and its refusals everywhere."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_without_cuda_the_kernel_is_unavailable_and_says_why(monkeypatch):
    from defuser_quant.integrations.gptqmodel import rows_kernel

    monkeypatch.setattr(rows_kernel, "_module", None)
    monkeypatch.setattr(rows_kernel, "_failure", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not rows_kernel.available()
    assert rows_kernel.why_unavailable() == "CUDA is not available"
    with pytest.raises(RuntimeError, match="block kernel is unavailable: CUDA is not available"):
        rows_kernel.block_update(*([torch.zeros(1)] * 9), 1, 15)


def test_a_failed_build_is_logged_once_and_remembered(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    from defuser_quant.integrations.gptqmodel import rows_kernel

    builds = []

    def no_compiler(**kwargs):
        builds.append(kwargs["name"])
        raise OSError("nvcc: command not found")

    monkeypatch.setattr(rows_kernel, "_module", None)
    monkeypatch.setattr(rows_kernel, "_failure", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    with caplog.at_level("WARNING"):
        assert not rows_kernel.available() and not rows_kernel.available()
    assert builds == ["defuser_quant_rows_block_update"]  # tried once per process
    assert rows_kernel.why_unavailable() == "OSError: nvcc: command not found"
    assert sum("block kernel is unavailable" in r.message for r in caplog.records) == 1


def _inputs(tasks_per_unit: list[int], rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tiles = []
    for _ in tasks_per_unit:  # an upper Cholesky factor of a damped inverse, as the solve passes
        a = torch.randn(128, 256, generator=g, dtype=torch.float64)
        h = a @ a.T + 128 * torch.eye(128, dtype=torch.float64)
        tiles.append(torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float())
    task_unit = torch.tensor([u for u, n in enumerate(tasks_per_unit) for _ in range(n)], dtype=torch.int32)
    total = len(task_unit) * rows
    work = torch.randn(total, 128, generator=g) * 3
    work[5, 7] = float("nan")  # a NaN row: clamp keeps it, as torch.clamp does
    work[9, :] = 0.0
    scale = torch.rand(2, total, generator=g) * 0.5 + 0.05
    zero = torch.randint(0, 16, (2, total), generator=g).float()
    column_group = torch.tensor([0] * 64 + [1] * 64, dtype=torch.int32)
    return [t.cuda() for t in (work, torch.stack(tiles), task_unit, scale, zero, column_group)]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_one_launch_gives_the_extensions_bits_per_unit(bits):
    """Units of 2, 1 and 3 tasks of 96 rows: one launch of ours against GPTQModel's extension called
    per unit (its rows stacked, their inverse), every output bit-identical (NaNs where it has them)."""
    from gptqmodel.quantization.gptq_cuda import block_update_available, gptq_block_update

    from defuser_quant.integrations.gptqmodel import rows_kernel

    assert rows_kernel.available(), rows_kernel.why_unavailable()
    if not block_update_available():
        pytest.skip("GPTQModel's extension did not build here")
    rows, maxq = 96, (1 << bits) - 1
    tasks_per_unit = [2, 1, 3]
    work, tiles, task_unit, scale, zero, column_group = _inputs(tasks_per_unit, rows)
    ours = [work.clone(), *(torch.zeros_like(work) for _ in range(3))]
    theirs = [work.clone(), *(torch.zeros_like(work) for _ in range(3))]
    rows_kernel.block_update(ours[0], tiles, task_unit, scale, zero, column_group, ours[1], ours[2], ours[3], rows, maxq)
    first = 0
    for unit, n in enumerate(tasks_per_unit):
        span = slice(first * rows, (first + n) * rows)
        gptq_block_update(theirs[0][span], tiles[unit].contiguous(), scale[:, span], zero[:, span], column_group,
                          theirs[1][span], theirs[2][span], theirs[3][span], maxq)
        first += n
    torch.cuda.synchronize()
    for name, a, b in zip(("work", "quantized", "errors", "losses"), ours, theirs, strict=True):
        assert _same_bits(a, b), name
    assert torch.isnan(ours[1][5]).any() and not torch.equal(ours[0], work)  # the NaN row and real updates


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
def test_bad_shapes_are_refused_in_one_line():
    from defuser_quant.integrations.gptqmodel import rows_kernel

    assert rows_kernel.available(), rows_kernel.why_unavailable()
    work, tiles, task_unit, scale, zero, column_group = _inputs([1, 1], 32)
    outs = [torch.zeros_like(work) for _ in range(3)]
    with pytest.raises(RuntimeError, match="task_unit must name one unit per task"):
        rows_kernel.block_update(work, tiles, task_unit, scale, zero, column_group, *outs, 48, 15)
    with pytest.raises(RuntimeError, match="maxq must be 2"):
        rows_kernel.block_update(work, tiles, task_unit, scale, zero, column_group, *outs, 32, 10)
    with pytest.raises(RuntimeError, match="work must have 128 contiguous columns"):
        rows_kernel.block_update(work[:, :64], tiles, task_unit, scale, zero, column_group, *outs, 32, 15)


def test_the_batched_solve_starts_the_kernels_load_when_it_starts_on_a_cuda_machine(monkeypatch):
    """Entering ``batched_solves`` on a machine with CUDA starts loading the kernel on a background thread
    (``load_ahead``) and does not wait for it; without ``rows_kernel`` or without CUDA it is not asked."""
    from defuser_quant.integrations.gptqmodel import batched, rows_kernel

    asked, waited = [], []
    monkeypatch.setattr(rows_kernel, "load_ahead", lambda: asked.append(True))
    monkeypatch.setattr(rows_kernel, "available", lambda: waited.append(True) or False)
    for cuda, setting, want in ((True, True, 1), (True, False, 0), (False, True, 0)):
        asked.clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        with batched.batched_solves(batched.BatchedSolve(rows_kernel=setting)):
            pass
        assert len(asked) == want and waited == [], (cuda, setting)


def _no_kernel_yet(monkeypatch, tmp_path, *, built: bool, lock: bool = False) -> list:
    """A process where the kernel was not loaded, CUDA is there, torch's build folder is ``tmp_path``'s
    (holding a built library or not); returns the threads ``load_inline`` was called on."""
    import threading

    import torch.utils.cpp_extension as cpp_extension

    from defuser_quant.integrations.gptqmodel import rows_kernel

    monkeypatch.setattr(rows_kernel, "_module", None)
    monkeypatch.setattr(rows_kernel, "_failure", None)
    monkeypatch.setattr(rows_kernel, "_ahead", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    folder = tmp_path / rows_kernel._NAME
    folder.mkdir()
    if built:
        (folder / f"{rows_kernel._NAME}.so").write_bytes(b"")
    if lock:
        (folder / "lock").write_bytes(b"")
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    loads: list = []

    def load_inline(**kwargs):
        loads.append(threading.current_thread().name)
        return object()

    monkeypatch.setattr(cpp_extension, "load_inline", load_inline)
    return loads


def test_a_cached_build_loads_on_a_background_thread_and_callers_take_it(monkeypatch, tmp_path):
    from defuser_quant.integrations.gptqmodel import rows_kernel

    loads = _no_kernel_yet(monkeypatch, tmp_path, built=True)
    thread = rows_kernel.load_ahead()
    assert thread is not None and not thread.daemon  # an exiting interpreter waits: torch's build lock is released
    thread.join(30)
    assert loads == [rows_kernel.AHEAD_THREAD]
    assert rows_kernel.available() and loads == [rows_kernel.AHEAD_THREAD]  # the loaded module, not a second load
    assert rows_kernel.load_ahead() is None


@pytest.mark.parametrize("lock", [False, True])
def test_without_a_cached_build_the_first_use_builds_it(monkeypatch, tmp_path, lock):
    from defuser_quant.integrations.gptqmodel import rows_kernel

    loads = _no_kernel_yet(monkeypatch, tmp_path, built=lock, lock=lock)  # a lock: another build under way
    rows_kernel.load_ahead().join(30)
    assert loads == [] and rows_kernel.why_unavailable() is None
    assert rows_kernel.available() and loads == ["MainThread"]


def test_without_cuda_nothing_is_started(monkeypatch, tmp_path):
    from defuser_quant.integrations.gptqmodel import rows_kernel

    loads = _no_kernel_yet(monkeypatch, tmp_path, built=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rows_kernel.load_ahead() is None and loads == []


def test_the_batched_solve_starts_without_waiting_for_the_load(monkeypatch, tmp_path):
    import threading
    import time

    import torch.utils.cpp_extension as cpp_extension

    from defuser_quant.integrations.gptqmodel import rows_kernel
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve, batched_solves

    pytest.importorskip("gptqmodel")
    loads = _no_kernel_yet(monkeypatch, tmp_path, built=True)
    release = threading.Event()
    record = cpp_extension.load_inline

    def slow_load(**kwargs):
        release.wait(20)
        return record(**kwargs)

    monkeypatch.setattr(cpp_extension, "load_inline", slow_load)
    begin = time.perf_counter()
    with batched_solves(BatchedSolve()):
        entered = time.perf_counter() - begin
        release.set()
    rows_kernel._ahead.join(30)
    assert entered < 10 and loads == [rows_kernel.AHEAD_THREAD]  # the start went on while the load waited
