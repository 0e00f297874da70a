"""The output folder: users' folders are precious.

A run writes into a hidden sibling (``.NAME.partial-PID``) and moves it into place at the end;
it holds an exclusive lock on the output for its whole life (``filelock``: the same on Linux,
macOS and Windows; a second run on the same folder is refused); a non-empty folder is replaced
only with ``--force``, by renaming the old one aside (``.NAME.old-PID``), moving the new one in
and only then deleting the old one, so that a kill at any moment loses nothing (the next run on
that folder finishes or undoes the swap). Only those two names, with the numeric id of a process
that no longer runs, are ever swept: a user's ``.NAME.partial-notes`` is never touched. A
``--out`` that is a symbolic link is followed: the run writes into the folder it points to.
Folders that no run may write (``.``, ``..``, ``/``, the home folder, any ancestor of the working
folder, a folder holding the inputs) are refused.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

from filelock import FileLock, Timeout

from compress_toolbox.errors import DaflError

_PID = re.compile(r"[1-9][0-9]{0,9}")  # a process id as we write it: ASCII digits, no leading 0
# Windows refuses to rename a folder while another program holds a file in it (an antivirus
# scanning the new student.onnx, Explorer's preview pane) for a moment: the rename is retried
WINDOWS = os.name == "nt"
RENAME_TRIES, RENAME_WAIT_S = 10, 0.3


def default_out_dir(teacher_path: str | Path) -> Path:
    """./dafl-out/<teacher file name without suffixes>/, made safe as a folder name."""
    stem = Path(teacher_path).name.split(".")
    name = next((part for part in stem if part), "teacher")  # ".hidden.onnx" -> "hidden"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "teacher"
    return Path("dafl-out") / name


def checkpoint_dir_for(out_dir: Path) -> Path:
    """Where --resume checkpoints live: beside the output folder, never inside it."""
    return out_dir.with_name(out_dir.name + ".checkpoint")


# What a finished or failed run leaves in its folder, and nothing else (see holds_only_run_files)
_RUN_FILE = re.compile(r"report\.(json|md)|curves\.png|samples\.png|history\.csv"
                       r"|(student|teacher)[\w.-]*\.(onnx|data|pt2|pt)")  # fmt: skip


def holds_only_run_files(path: Path) -> bool:
    """Whether the folder at ``path`` holds a run's output files and nothing else: no folder,
    link or file of the user's (a note added beside a failed run's report)."""
    entries = list(path.iterdir()) if path.is_dir() else []
    return bool(entries) and all(
        entry.is_file() and not entry.is_symlink() and _RUN_FILE.fullmatch(entry.name)
        for entry in entries
    )


def _rename(source: Path, target: Path) -> None:
    """``os.replace``, retried for a few seconds where Windows refuses it for a file held open
    (see RENAME_TRIES)."""
    for attempt in range(RENAME_TRIES):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if not WINDOWS or attempt == RENAME_TRIES - 1:
                raise
            time.sleep(RENAME_WAIT_S)


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


class OutputFolder:
    """One run's output folder; use ``check()``, then ``with folder:`` around the work, writing
    into ``folder.work`` and calling ``folder.commit()`` at the end."""

    def __init__(self, path: str | Path, *, force: bool = False,
                 inputs: tuple[str | Path | None, ...] = ()) -> None:  # fmt: skip
        self.given = Path(path)
        # A link is followed once, here: the lock, the work folder and the swap all happen
        # beside the real folder, and the link keeps pointing at the finished output.
        self.path = Path(os.path.realpath(self.given)) if self.given.is_symlink() else self.given
        self.force = force
        self.inputs = [Path(p) for p in inputs if p]
        self.name = self.path.name
        self.parent = self.path.parent
        self._lock: FileLock | None = None
        self._made: list[Path] = []  # folders above the output that __enter__ created
        self._kept: Path | None = None  # finished work that could not be moved into place

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
        if self.given.is_symlink() and not self.path.exists():
            raise DaflError(f"--out {self.given}: is a link to {self.path}, which does not exist")
        target = self.path.expanduser().resolve()
        cwd = Path.cwd().resolve()
        forbidden = {Path(target.anchor), Path.home().resolve(), cwd, *cwd.parents}
        if not self.name or self.name in (".", "..") or target in forbidden:
            raise DaflError(
                f"--out {self.given}: refusing to write the output into {target} (the root, home "
                "or working folder or one of its parents); give a new folder such as "
                "--out dafl-out/run1"
            )
        for source in self.inputs:
            resolved = source.expanduser().resolve()
            if resolved == target or target in resolved.parents:
                raise DaflError(f"--out {self.given}: it holds the input {source}; choose another")
        if self.path.exists() and not self.path.is_dir():
            raise DaflError(f"--out {self.given}: is a file, not a folder")
        if _is_nonempty_dir(self.path) and not self.force:
            raise DaflError(
                f"{self.given}: output folder exists and is not empty (use --force to replace it, "
                "or --out DIR)"
            )

    # -- the run ----------------------------------------------------------------------------
    def __enter__(self) -> OutputFolder:
        lock = FileLock(self.lock_path, timeout=0)
        # removed again if the run leaves nothing in them (a teacher that does not load)
        self._made = [p for p in (self.parent, *self.parent.parents) if not p.exists()]
        try:
            self._lock_in_parent(lock)
        except Timeout:  # before OSError: filelock's Timeout is a TimeoutError
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
            self._recover()
            self.work.mkdir()
        except OSError as error:
            self._unlock()
            raise DaflError(f"--out {self.path}: cannot create {self.work} "
                            f"({error.strerror})") from None  # fmt: skip
        return self

    def _lock_in_parent(self, lock: FileLock) -> None:
        """Make the parent folder and take the lock in it; again if another run that had made
        the same parent removed it in between (it found nothing left in it)."""
        for attempt in range(3):
            self.parent.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire()
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._kept is None:
            shutil.rmtree(self.work, ignore_errors=True)
        self._unlock()
        for folder in self._made:  # the deepest first; a folder with anything in it stays
            try:
                folder.rmdir()
            except OSError:
                break

    def _ours(self, kind: str) -> list[tuple[int, Path]]:
        """(pid, folder) for each ``.NAME.<kind>-PID`` folder (``kind``: partial or old) with a
        numeric PID: the names this class makes; links and anything else are never ours."""
        prefix = f".{self.name}.{kind}-"
        found = []
        for entry in self.parent.iterdir():
            pid = entry.name[len(prefix) :]
            if (entry.name.startswith(prefix) and _PID.fullmatch(pid)
                    and entry.is_dir() and not entry.is_symlink()):  # fmt: skip
                found.append((int(pid), entry))
        return found

    def _holder(self) -> str:
        """The process id(s) of the run holding the lock, read from its work folder's name."""
        try:
            alive = sorted(pid for pid, _ in self._ours("partial") if _process_alive(pid))
        except OSError:  # the folder cannot be listed: the message goes without the id
            alive = []
        return ", ".join(map(str, alive)) or "unknown"

    def _recover(self) -> None:
        """Clean up after killed runs. We hold the lock, so no live run owns these folders;
        a folder named for a process that still runs (an id reused since) is left alone all
        the same, and this process's own id counts as dead (containers reuse ids)."""
        for pid, stale in self._ours("partial"):
            if _is_dead(pid):
                shutil.rmtree(stale, ignore_errors=True)
        for pid, old in self._ours("old"):
            if not _is_dead(pid):
                continue
            if self.path.exists() or self.path.is_symlink():  # the swap had finished
                shutil.rmtree(old, ignore_errors=True)  # the old output was to be deleted
            else:  # killed between the two renames: put the old output back
                _rename(old, self.path)

    def _taken(self) -> bool:
        """Something this run may not replace is at ``path`` now (it appeared during the run):
        files without --force, a link or a file."""
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            return True
        return _is_nonempty_dir(self.path) and not self.force

    def commit(self) -> Path:
        """Move the finished work into place; return where it went. Should the move fail, the
        finished work is kept where it is and the error says so: it is never deleted."""
        try:
            return self._move_into_place()
        except OSError as error:
            self._kept = self.work
            raise DaflError(f"--out {self.given}: cannot move the finished output into place "
                            f"({error.strerror}); it is kept in {self.work}") from None  # fmt: skip

    def _move_into_place(self) -> Path:
        if self._taken():  # leave it alone, keep ours beside it
            n = 1
            while self.parent.joinpath(f"{self.name}-{n}").exists():
                n += 1
            elsewhere = self.parent / f"{self.name}-{n}"
            _rename(self.work, elsewhere)
            raise DaflError(
                f"{self.path}: files appeared in the output folder during the run; they were "
                f"left alone and this run's output is in {elsewhere}"
            )
        if _is_nonempty_dir(self.path):
            aside = self.parent / f".{self.name}.old-{os.getpid()}"
            _rename(self.path, aside)
            try:
                _rename(self.work, self.path)
            except BaseException:  # also Ctrl-C / SIGTERM between the two renames
                _rename(aside, self.path)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            if self.path.is_dir():
                self.path.rmdir()  # empty: replacing it loses nothing
            _rename(self.work, self.path)
        return self.path

    def _unlock(self) -> None:
        if self._lock is None:
            return
        try:
            # Removed while still held: a run that opened the file before sees it unlinked
            # once it gets the lock and does not count it (filelock >= 4). Windows refuses
            # to remove an open file; filelock removes it there on release.
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
        finally:
            self._lock.release()
            self._lock = None


def _is_dead(pid: int) -> bool:
    """A folder named for ``pid`` belongs to no running process of ours."""
    return pid == os.getpid() or not _process_alive(pid)


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (True when the system will not say: folders are then
    left alone)."""
    if not 0 < pid < 2**31:
        return False  # no process has this id
    if os.name == "nt":  # pragma: no cover - Windows
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _windows_process_alive(pid: int) -> bool:  # pragma: no cover - Windows
    # os.kill(pid, 0) would terminate the process on Windows: ask the kernel instead
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = wintypes.HANDLE  # not the default int: handles are 64-bit
    kernel32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    kernel32.GetExitCodeProcess.argtypes = [wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD)]
    kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)
