"""The output folder: users' folders are precious.

A run writes into a hidden sibling (``.NAME.partial-PID``) and moves it into place at the end;
it holds an exclusive lock on the output for its whole life (a second run on the same folder is
refused); a non-empty folder is replaced only with ``--force``, by renaming the old one aside,
moving the new one in and only then deleting the old one, so that a kill at any moment loses
nothing (the next run on that folder finishes or undoes the swap). Folders that no run may write
(``.``, ``..``, ``/``, the home folder, any ancestor of the working folder, a folder holding the
inputs) are refused.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .errors import DaflError

try:  # POSIX
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


def default_out_dir(teacher_path: str | Path) -> Path:
    """./dafl-out/<teacher file name without suffixes>/, made safe as a folder name."""
    stem = Path(teacher_path).name.split(".")
    name = next((part for part in stem if part), "teacher")  # ".hidden.onnx" -> "hidden"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "teacher"
    return Path("dafl-out") / name


def checkpoint_dir_for(out_dir: Path) -> Path:
    """Where --resume checkpoints live: beside the output folder, never inside it."""
    return out_dir.with_name(out_dir.name + ".checkpoint")


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


class OutputFolder:
    """One run's output folder; use ``check()``, then ``with folder:`` around the work, writing
    into ``folder.work`` and calling ``folder.commit()`` at the end."""

    def __init__(self, path: str | Path, *, force: bool = False,
                 inputs: tuple[str | Path | None, ...] = ()) -> None:  # fmt: skip
        self.path = Path(path)
        self.force = force
        self.inputs = [Path(p) for p in inputs if p]
        self.name = self.path.name
        self.parent = self.path.parent
        self._lock_fd: int | None = None

    @property
    def work(self) -> Path:
        """Where this run writes; moved to ``path`` by ``commit``."""
        return self.parent / f".{self.name}.partial-{os.getpid()}"

    @property
    def lock_path(self) -> Path:
        return self.parent / f".{self.name}.lock"

    @property
    def checkpoint_dir(self) -> Path:
        return checkpoint_dir_for(self.path)

    # -- before any work --------------------------------------------------------------------
    def check(self) -> None:
        """Refuse folders no run may write, and a non-empty one without --force."""
        target = self.path.expanduser().resolve()
        cwd = Path.cwd().resolve()
        forbidden = {Path(target.anchor), Path.home().resolve(), cwd, *cwd.parents}
        if not self.name or self.name in (".", "..") or target in forbidden:
            raise DaflError(
                f"--out {self.path}: refusing to write the output into {target} (the root, home "
                "or working folder or one of its parents); give a new folder such as "
                "--out dafl-out/run1"
            )
        for source in self.inputs:
            resolved = source.expanduser().resolve()
            if resolved == target or target in resolved.parents:
                raise DaflError(f"--out {self.path}: it holds the input {source}; choose another")
        if self.path.exists() and not self.path.is_dir():
            raise DaflError(f"--out {self.path}: is a file, not a folder")
        if _is_nonempty_dir(self.path) and not self.force:
            raise DaflError(
                f"{self.path}: output folder exists and is not empty (use --force to replace it, "
                "or --out DIR)"
            )

    # -- the run ----------------------------------------------------------------------------
    def __enter__(self) -> OutputFolder:
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise DaflError(
                f"--out {self.path}: cannot write in {self.parent} ({error.strerror})"
            ) from None
        if not _try_lock(fd) or not _same_file(fd, self.lock_path):
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaflError(
                f"{self.path}: another dafl-compress run (pid {holder}) is writing this output "
                "folder; wait for it or choose another --out"
            )
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        try:
            self._recover()
            self.work.mkdir()
        except OSError as error:
            self._unlock()
            raise DaflError(f"--out {self.path}: cannot create {self.work} "
                            f"({error.strerror})") from None  # fmt: skip
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self._unlock()

    def _recover(self) -> None:
        """Clean up after killed runs (we hold the lock: no live run owns these)."""
        for stale in self.parent.glob(f".{glob_escape(self.name)}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in self.parent.glob(f".{glob_escape(self.name)}.old-*"):
            if self.path.exists():  # the swap had finished: the old output was to be deleted
                shutil.rmtree(old, ignore_errors=True)
            else:  # killed between the two renames: put the old output back
                os.replace(old, self.path)

    def commit(self) -> Path:
        """Move the finished work into place; return where it went."""
        if _is_nonempty_dir(self.path) and not self.force:
            # Something appeared in --out during the run: leave it alone, keep ours beside it.
            n = 1
            while self.parent.joinpath(f"{self.name}-{n}").exists():
                n += 1
            elsewhere = self.parent / f"{self.name}-{n}"
            os.replace(self.work, elsewhere)
            raise DaflError(
                f"{self.path}: files appeared in the output folder during the run; they were "
                f"left alone and this run's output is in {elsewhere}"
            )
        if self.path.is_dir() and _is_nonempty_dir(self.path):
            aside = self.parent / f".{self.name}.old-{os.getpid()}"
            os.replace(self.path, aside)
            try:
                os.replace(self.work, self.path)
            except BaseException:  # also Ctrl-C / SIGTERM between the two renames
                os.replace(aside, self.path)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            if self.path.is_dir():
                self.path.rmdir()  # empty: replacing it loses nothing
            os.replace(self.work, self.path)
        return self.path

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            self.lock_path.unlink(missing_ok=True)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[\]])", r"[\1]", name)


def _same_file(fd: int, path: Path) -> bool:
    """The locked file is still the one at ``path`` (not one a finishing run just deleted)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _try_lock(fd: int) -> bool:
    """An exclusive, non-blocking lock on ``fd``, released when the process dies."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True
