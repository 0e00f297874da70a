"""Nothing lost, on any platform: the stale-folder sweep touches only names this tool makes
(``.NAME.partial-PID`` and ``.NAME.old-PID`` of a process that no longer runs), a symlinked
``--out`` is written through, a full disk while checkpointing is one line with nothing left
behind, the output lock is filelock's (no fcntl needed), and the main path works under the
``spawn`` start method (Windows' and macOS's default).

Runs train for two iterations: a tiny run may end with exit 3 ("student failed", its folder
kept), so the folder behaviour is asserted whatever the verdict.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch
from conftest import one_error_line, run_cli
from filelock import FileLock
from torch import nn

from cli.main import main
from compress_toolbox.distillation.parts import Checkpointer
from compress_toolbox.errors import DaflError
from compress_toolbox.outdir import OutputFolder

REPO = Path(__file__).resolve().parent.parent
FAST = ["--iters", "2", "--batch-size", "16", "--no-progress", "--threads", "1"]
FINISHED = (0, 3)  # done, or "student failed" with its folder kept: both commit the folder


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny ONNX classifier trained on sklearn's 8x8 digits (an untrained one answers one
    class, which the collapse guard refuses before any folder is written)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target)
    model = Tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("teacher") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, 1, 8, 8),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}})  # fmt: skip
    return path


def dead_pid() -> int:
    """The id of a process that has just ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def user_folder(path: Path, text: str = "keep me") -> Path:
    path.mkdir()
    (path / "notes.txt").write_text(text)
    return path


# -- 1. the sweep takes only what this tool made -----------------------------------------------
def test_users_look_alike_folders_survive_a_run(teacher, tmp_path, capsys):
    names = ["partial-notes", "old-backup", "partial-007", "partial-12x", "old-", "partial-"]
    theirs = [user_folder(tmp_path / f".out.{name}") for name in names]
    elsewhere = user_folder(tmp_path / "elsewhere")
    link = tmp_path / f".out.partial-{dead_pid()}"
    link.symlink_to(elsewhere, target_is_directory=True)  # a link is never ours, whatever its name
    code = run_cli(teacher, "--out", tmp_path / "out", *FAST)
    assert code in FINISHED, capsys.readouterr().err
    for folder in theirs:
        assert (folder / "notes.txt").read_text() == "keep me", folder
    assert link.is_symlink() and (elsewhere / "notes.txt").read_text() == "keep me"
    out = tmp_path / "out"
    assert (out / "student.onnx").is_file() and not (out / "notes.txt").exists()
    assert not (tmp_path / "out-1").exists()  # nothing of theirs was moved into --out


def test_only_dead_runs_folders_are_swept(tmp_path):
    """A killed run's work folder goes; one named for a process that still runs (an id reused
    since) stays; a killed swap's old output is put back."""
    out = tmp_path / "out"
    stale = user_folder(tmp_path / f".out.partial-{dead_pid()}")
    old = user_folder(tmp_path / f".out.old-{dead_pid()}", "previous output")
    process = sleeper()
    try:
        alive = user_folder(tmp_path / f".out.partial-{process.pid}")
        with OutputFolder(out):
            assert not stale.exists()
            assert (alive / "notes.txt").read_text() == "keep me"
            assert not old.exists() and (out / "notes.txt").read_text() == "previous output"
    finally:
        process.kill()
        process.wait()


# -- 2. a symlinked --out ----------------------------------------------------------------------
def test_symlinked_out_is_written_through(teacher, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    code = run_cli(teacher, "--out", link, *FAST)
    assert code in FINISHED, capsys.readouterr().err
    assert link.is_symlink() and Path(os.readlink(link)) == real
    assert (real / "student.onnx").is_file() and (real / "report.md").is_file()
    left = {p.name for p in tmp_path.iterdir()} - {"real.checkpoint"}  # kept after exit 3
    assert left == {"link", "real"}  # no work folder, no lock, nothing beside the link


def test_dangling_symlink_out_is_refused_before_any_work(teacher, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing", target_is_directory=True)
    assert run_cli(teacher, "--out", link, *FAST) == 2
    one_error_line(capsys, str(link), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_a_teacher_that_does_not_load_leaves_no_default_folder(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    monkeypatch.chdir(tmp_path)
    assert main([str(bad), "--no-progress"]) == 2
    one_error_line(capsys, "bad.onnx", "not a valid ONNX model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]  # no ./dafl-out/
    (tmp_path / "dafl-out").mkdir()  # the user's own folder stays, even if empty
    assert main([str(bad), "--no-progress"]) == 2
    assert (tmp_path / "dafl-out").is_dir()


def test_a_link_appearing_at_out_during_the_run_keeps_the_output(teacher, tmp_path):
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def intruder(iteration):
        if iteration == 1:
            out.symlink_to(elsewhere, target_is_directory=True)

    from compress_toolbox import CompressConfig, compress

    with pytest.raises(DaflError, match="left alone") as error:
        compress(
            teacher,
            CompressConfig.from_options(out=out, iters=2, batch_size=16, progress=False, threads=1),
            on_iteration=intruder,
        )
    assert "out-1" in str(error.value)
    assert out.is_symlink() and not any(elsewhere.iterdir())
    assert (tmp_path / "out-1" / "student.onnx").is_file()


# -- 3. a full disk while checkpointing --------------------------------------------------------
def _fill_the_disk(monkeypatch, where: str) -> None:
    """ENOSPC on the checkpoint's temporary file, after part of it was written (``write``) or
    when it is flushed to disk (``fsync``, as on file systems that allocate late)."""
    if where == "write":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            name = str(getattr(f, "name", f))
            if not name.endswith(".tmp"):
                return real_save(obj, f, *args, **kwargs)
            if hasattr(f, "write"):
                f.write(b"PK\x03\x04 half a checkpoint")
                f.flush()
            else:
                Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", save)
    else:

        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch, where):
    path = tmp_path / "out.checkpoint" / "dafl_checkpoint.pt"
    checkpointer = Checkpointer(path, every_s=60)
    checkpointer.save({"iteration": 1})
    _fill_the_disk(monkeypatch, where)
    with pytest.raises(DaflError) as error:
        checkpointer.save({"iteration": 2})
    message = str(error.value)
    assert message.startswith("disk full") and str(path) in message and "\n" not in message
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .tmp
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["iteration"] == 1  # the previous one is whole


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_while_checkpointing_is_one_line(teacher, tmp_path, capsys, monkeypatch, where):
    _fill_the_disk(monkeypatch, where)  # the run's last checkpoint, at the end of training
    assert run_cli(teacher, "--out", tmp_path / "out", *FAST) == 2
    one_error_line(capsys, "disk full", str(tmp_path / "out.checkpoint" / "dafl_checkpoint.pt"))
    assert not list(tmp_path.rglob("*.tmp"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_planted_link_at_the_temporary_name_is_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    path = tmp_path / "ck" / "dafl_checkpoint.pt"
    path.parent.mkdir()
    path.with_name(path.name + ".tmp").symlink_to(victim)
    Checkpointer(path, every_s=60).save({"iteration": 1})
    assert victim.read_text() == "keep me"
    assert torch.load(path, weights_only=True)["iteration"] == 1


# -- 4. a portable lock ------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys
    from compress_toolbox.outdir import OutputFolder
    with OutputFolder(sys.argv[1]):
        print("holding", flush=True)
        sys.stdin.read()  # until the test closes our stdin
""")


def test_a_run_in_another_process_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(DaflError, match=f"another dafl-compress run \\(pid {holder.pid}\\)"):
            OutputFolder(out).__enter__()
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    with OutputFolder(out):  # free again once the first run ended
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock file, no work folder


def test_filelock_holder_in_another_thread_is_refused(tmp_path):
    out = tmp_path / "out"
    folder = OutputFolder(out)
    held, release = threading.Event(), threading.Event()

    def hold():
        with FileLock(folder.lock_path, timeout=5):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(30)
        with pytest.raises(DaflError, match="another dafl-compress run"):
            folder.__enter__()
    finally:
        release.set()
        thread.join(30)
    with folder:
        assert folder.work.is_dir()


SECOND_HOLDER = textwrap.dedent("""
    import sys
    sys.modules["fcntl"] = None  # a platform without fcntl, as Windows
    import warnings
    warnings.simplefilter("ignore")
    from compress_toolbox.errors import DaflError
    from compress_toolbox.outdir import OutputFolder
    with OutputFolder(sys.argv[1]):
        try:
            OutputFolder(sys.argv[1]).__enter__()
        except DaflError as error:
            print("refused:", error)
    with OutputFolder(sys.argv[1]):
        print("free again")
""")


def test_the_lock_works_without_fcntl(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", SECOND_HOLDER, str(out)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"refused: {out}: another dafl-compress run (pid ")
    assert lines[1] == "free again"
    assert not any(tmp_path.iterdir())


# -- 5. the spawn start method -----------------------------------------------------------------
SPAWN_RUN = textwrap.dedent("""
    import multiprocessing
    import sys

    if __name__ == "__main__":
        multiprocessing.set_start_method("spawn", force=True)
        from cli.main import entry_point

        sys.argv = ["dafl-compress", *sys.argv[1:]]
        entry_point()
""")


def _spawn_run(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    script = tmp_path / "run_spawn.py"
    script.write_text(SPAWN_RUN)
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_main_path_under_spawn(teacher, tmp_path):
    done = _spawn_run(tmp_path, teacher, "--out", tmp_path / "out", *FAST)
    assert done.returncode in FINISHED, done.stderr
    assert "freeze_support" not in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out" / "student.onnx").is_file()


@pytest.mark.slow
def test_nproc_under_spawn(teacher, tmp_path):
    done = _spawn_run(tmp_path, teacher, "--out", tmp_path / "out", "--nproc", "2", *FAST)
    assert done.returncode in FINISHED, done.stderr
    assert "freeze_support" not in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out" / "student.onnx").is_file()


def test_frozen_entry_point_calls_freeze_support(monkeypatch):
    import multiprocessing

    from cli.main import entry_point

    calls = []
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(multiprocessing, "freeze_support", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["dafl-compress", "--help"])
    with pytest.raises(SystemExit) as done:
        entry_point()
    assert done.value.code == 0 and calls == [1]


def test_a_failed_move_keeps_the_finished_output(tmp_path, monkeypatch):
    """The finished output was deleted when the last move failed (a symlinked --out gave
    NotADirectoryError at the very end): now it stays, and the error says where."""
    with pytest.raises(DaflError, match="it is kept in") as caught:
        with OutputFolder(tmp_path / "out") as folder:
            (folder.work / "student.onnx").write_text("new")

            def fail(*args, **kwargs):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

            monkeypatch.setattr(os, "replace", fail)
            folder.commit()
    monkeypatch.undo()
    kept = Path(str(caught.value).rsplit("it is kept in ", 1)[1])
    assert (kept / "student.onnx").read_text() == "new"
