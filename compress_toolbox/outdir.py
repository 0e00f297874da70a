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

from filelock import FileLock, Timeout

from .errors import DaflError


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
        if self.path.is_symlink():  # write where the link points; the link then shows the result
            self.path = self.path.resolve()
        self.force = force
        self.inputs = [Path(p) for p in inputs if p]
        self.name = self.path.name
        self.parent = self.path.parent
        self._lock: FileLock | None = None
        self._kept: Path | None = None  # finished work that could not be moved into place

    @property
    def work(self) -> Path:
        """Where this run writes; moved to ``path`` by ``commit``."""
        return self.parent / f".{self.name}.partial-{os.getpid()}"

    @property
    def lock_path(self) -> Path:
        return self.parent / f".{self.name}.lock"

    @property
    def owner_path(self) -> Path:
        """Names the process holding the lock (the lock file itself is filelock's)."""
        return self.parent / f".{self.name}.lock.pid"

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
        lock = FileLock(self.lock_path, timeout=0)  # portable: POSIX flock, Windows locking
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Timeout:
            raise DaflError(
                f"{self.path}: another dafl-compress run (pid {self._holder()}) is writing this "
                "output folder; wait for it or choose another --out"
            ) from None
        except OSError as error:
            raise DaflError(
                f"--out {self.path}: cannot write in {self.parent} ({error.strerror})"
            ) from None
        self._lock = lock
        try:
            self.owner_path.write_text(str(os.getpid()))
            self._recover()
            self.work.mkdir()
        except OSError as error:
            self._unlock()
            raise DaflError(f"--out {self.path}: cannot create {self.work} "
                            f"({error.strerror})") from None  # fmt: skip
        return self

    def _holder(self) -> str:
        try:
            return self.owner_path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._kept is None:
            shutil.rmtree(self.work, ignore_errors=True)
        self._unlock()

    def _recover(self) -> None:
        """Clean up after killed runs: only folders this tool names (``.NAME.partial-PID`` and
        ``.NAME.old-PID``, PID a number) of processes no longer alive. We hold the lock, so no
        live run owns them; a folder of the user's with a similar name is never touched."""
        for stale in self._ours("partial"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in self._ours("old"):
            if self.path.exists():  # the swap had finished: the old output was to be deleted
                shutil.rmtree(old, ignore_errors=True)
            else:  # killed between the two renames: put the old output back
                os.replace(old, self.path)

    def _ours(self, kind: str) -> list[Path]:
        pattern = re.compile(rf"\.{re.escape(self.name)}\.{kind}-(\d+)")
        return [path for path in self.parent.glob(f".{glob_escape(self.name)}.{kind}-*")
                if (match := pattern.fullmatch(path.name)) and path.is_dir()
                and not path.is_symlink() and not _alive(int(match[1]))]  # fmt: skip

    def commit(self) -> Path:
        """Move the finished work into place; return where it went. Should the move fail, the
        finished work is kept where it is and the error says so: it is never deleted."""
        try:
            return self._move_into_place()
        except OSError as error:
            self._kept = self.work
            raise DaflError(f"--out {self.path}: cannot move the finished output into place "
                            f"({error.strerror}); it is kept in {self.work}") from None  # fmt: skip

    def _move_into_place(self) -> Path:
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
        if self._lock is None:
            return
        try:
            self.owner_path.unlink(missing_ok=True)
            self.lock_path.unlink(missing_ok=True)  # filelock retries on an unlinked file
        finally:
            self._lock.release()
            self._lock = None


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[\]])", r"[\1]", name)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (this one counts as alive). Where the platform has
    no harmless probe (Windows: ``os.kill`` would terminate it), every other PID counts as
    dead: the lock already guarantees that no run of ours is using the folder."""
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True
