"""The output place is checked before any work; leftovers of killed runs are cleaned; modes
follow the umask; a symlinked destination is followed (issue 14 items 1, 4, 6)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from defuser_quant.checkpoint.staging import clean_leftovers
from defuser_quant.core.errors import DefuserQuantError
from defuser_quant.jobs.output import OutputDirError, check_output_dir, staged_output


def _dead_pid() -> int:
    pid = 999_999
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_mount_point_is_refused_up_front():
    mount = next((Path(p) for p in ("/dev/shm", "/proc", "/sys") if os.path.ismount(p)), None)
    if mount is None:
        pytest.skip("no mount point to try")
    with pytest.raises(OutputDirError, match="is a mount point.*write into a folder inside it"):
        check_output_dir(mount, overwrite=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_parent_is_refused_up_front(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="permission denied"):
            check_output_dir(locked / "out", overwrite=False)
    finally:
        locked.chmod(0o700)


def test_only_an_earlier_jobs_output_is_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="holds no job.json"):
        check_output_dir(out, overwrite=True)
    (out / "job.json").write_text("{}")
    with pytest.raises(OutputDirError, match="pass --overwrite"):
        check_output_dir(out, overwrite=False)
    assert check_output_dir(out, overwrite=True) == out.resolve()


def test_symlinked_target_is_followed_and_the_link_kept(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "job.json").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    with staged_output(link, overwrite=True) as staging:
        (staging / "job.json").write_text("new")
    assert link.is_symlink() and (link / "job.json").read_text() == "new"
    assert (real / "job.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_leftovers_of_killed_runs_are_cleaned_and_a_lost_output_restored(tmp_path):
    pid = _dead_pid()
    partial = tmp_path / f".out.partial-{pid}-0badc0de"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    old = tmp_path / f".out.old-{pid}"  # killed between the two renames: the earlier output
    old.mkdir()
    (old / "job.json").write_text("earlier")
    other = tmp_path / f".other.partial-{pid}-0badc0de"  # not ours: another target's
    other.mkdir()
    done = clean_leftovers(tmp_path / "out")
    assert len(done) == 2 and any("restored" in line for line in done)
    assert (tmp_path / "out" / "job.json").read_text() == "earlier"
    assert not partial.exists() and not old.exists() and other.exists()


def test_a_run_still_writing_the_target_is_not_disturbed(tmp_path):
    busy = tmp_path / f".out.partial-{os.getppid()}-0badc0de"
    busy.mkdir()
    with pytest.raises(DefuserQuantError, match="another run is writing"):
        clean_leftovers(tmp_path / "out")
    assert busy.exists()


def test_output_modes_follow_the_umask(tmp_path):
    previous = os.umask(0o002)
    try:
        with staged_output(tmp_path / "out", overwrite=False) as staging:
            private = staging / "model.safetensors"
            private.write_bytes(b"x")
            private.chmod(0o600)  # as some writers leave their temporary files
            (staging / "sub").mkdir(mode=0o700)
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o775
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o775
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o664


def test_convert_follows_a_symlinked_destination(tmp_path):
    from defuser_quant.assets import TINY_MOE_PATH
    from defuser_quant.cli import main

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "dst"
    link.symlink_to(real)
    assert main(["convert", str(TINY_MOE_PATH), str(link), "--to", "fused", "--json", "--no-fsync"]) == 0
    assert link.is_symlink() and (real / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "real"]


def test_leftover_without_a_process_id_is_reported_with_the_command(tmp_path):
    old_style = tmp_path / ".out.partial-1a2b3c4d"  # an older version's name: whose it is is unknown
    old_style.mkdir()
    (done,) = clean_leftovers(tmp_path / "out")
    assert f"rm -rf '{old_style}'" in done and old_style.exists()


def test_convert_cleans_what_a_killed_convert_left(tmp_path):
    from defuser_quant.assets import TINY_MOE_PATH
    from defuser_quant.cli import main

    left = tmp_path / f".dst.partial-{_dead_pid()}-0badc0de"
    left.mkdir()
    (left / "model-00001-of-00002.safetensors").write_bytes(b"half")
    assert main(["convert", str(TINY_MOE_PATH), str(tmp_path / "dst"), "--to", "fused", "--json", "--no-fsync"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_without_matplotlib_the_job_still_delivers(tmp_path, monkeypatch):
    """Checked before the work; the picture is skipped with a note, the result is kept."""
    import json
    import sys

    from defuser_quant.calibration.coverage import build_report
    from defuser_quant.cli import main
    from defuser_quant.jobs.backends import llmcompressor as backend
    from defuser_quant.jobs.context import BackendResult

    def finished(ctx):
        (ctx.staging_dir / "model.safetensors").write_bytes(b"result of minutes of work")
        return BackendResult(coverage=build_report({"model.layers.0.mlp.experts": ([3, 9], [0, 0])}, min_tokens=4))

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setattr(backend, "run", finished)
    assert main(["run", "-o", str(tmp_path / "out")]) == 0
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "coverage.png").exists()
    assert job["coverage"]["heatmap"] is None
    assert any("matplotlib is not installed" in note for note in job["notes"])
