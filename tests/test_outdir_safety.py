"""Nothing of the user's is lost: the stale-folder sweep touches only what this tool made, a
symlinked --out works, a full disk while checkpointing says so and leaves nothing half-written,
the lock is portable, and the main path runs under the ``spawn`` start method (Windows)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from compress_toolbox import training
from compress_toolbox.errors import DaflError
from compress_toolbox.outdir import OutputFolder
from compress_toolbox.training import Checkpointer

REPO = Path(__file__).resolve().parent.parent


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_sweep_leaves_a_user_s_folders_with_similar_names_alone(tmp_path):
    notes = tmp_path / ".out.partial-notes"
    backup = tmp_path / ".out.old-backup"
    for folder in (notes, backup):
        folder.mkdir()
        (folder / "mine.txt").write_text("keep")
    stale = tmp_path / f".out.partial-{_dead_pid()}"
    stale.mkdir()
    with OutputFolder(tmp_path / "out") as folder:
        (folder.work / "student.onnx").write_text("new")
        folder.commit()
    assert (notes / "mine.txt").read_text() == "keep"
    assert (backup / "mine.txt").read_text() == "keep"
    assert not (tmp_path / "out" / "mine.txt").exists()  # the backup was not moved in
    assert not stale.exists()  # ours, of a dead process: swept


def test_a_live_process_s_partial_folder_is_left_alone(tmp_path):
    live = tmp_path / f".out.partial-{os.getppid()}"  # a process that is certainly alive
    live.mkdir()
    with OutputFolder(tmp_path / "out") as folder:
        folder.commit()
    assert live.exists()


def test_a_symlinked_out_receives_the_output(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    folder = OutputFolder(link)
    folder.check()
    with folder:
        (folder.work / "student.onnx").write_text("new")
        folder.commit()
    assert (link / "student.onnx").read_text() == "new"
    assert (target / "student.onnx").read_text() == "new"


def test_a_failed_move_keeps_the_finished_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(DaflError, match="it is kept in") as caught:
        with OutputFolder(out) as folder:
            (folder.work / "student.onnx").write_text("new")
            monkeypatch.setattr(os, "replace", _fail_with(errno.EXDEV))
            folder.commit()
    kept = Path(str(caught.value).rsplit("it is kept in ", 1)[1])
    assert (kept / "student.onnx").read_text() == "new"


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def test_a_full_disk_while_checkpointing_says_so_and_leaves_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "out.checkpoint" / "dafl_checkpoint.pt"

    def half_written(obj, file):
        Path(file).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training.torch, "save", half_written)
    with pytest.raises(DaflError, match=r"checkpoint.pt: cannot save the checkpoint \(disk full"):
        Checkpointer(path, every_s=60).save({"weights": torch.zeros(2)})
    assert not list(path.parent.glob("*.tmp"))


def test_a_second_holder_of_the_portable_lock_is_refused(tmp_path):
    out = tmp_path / "out"
    held = FileLock(tmp_path / ".out.lock")
    with held:
        (tmp_path / ".out.lock.pid").write_text("4242")
        with pytest.raises(DaflError, match=r"another dafl-compress run \(pid 4242\)"):
            with OutputFolder(out):
                pass
    with OutputFolder(out) as folder:  # free again
        folder.commit()
    assert not (tmp_path / ".out.lock").exists() and not (tmp_path / ".out.lock.pid").exists()


def test_the_main_path_runs_under_the_spawn_start_method(tmp_path):
    """The person who asked for this tool met `freeze_support` errors on Windows: processes
    started with `spawn` re-import the main module. A whole short run under `spawn`."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing
        import sys

        import torch
        from torch import nn

        from cli.main import main

        if __name__ == "__main__":
            multiprocessing.set_start_method("spawn", force=True)
            torch.manual_seed(0)
            model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
            torch.onnx.export(model, (torch.randn(2, 1, 4, 4),), r"{tmp_path / 't.onnx'}",
                              dynamo=False, input_names=["x"], dynamic_axes={{"x": {{0: "n"}}}})
            sys.exit(main([r"{tmp_path / 't.onnx'}", "--out", r"{tmp_path / 'out'}",
                           "--iters", "2", "--batch-size", "8", "--no-progress"]))
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode in (0, 3), done.stderr  # 3: two iterations make a weak student
    assert (tmp_path / "out" / "student.onnx").is_file()
    assert "freeze_support" not in done.stderr and "Traceback" not in done.stderr
