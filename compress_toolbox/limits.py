"""Bounds on work that can run away on a user's model: the wall time and memory of a block.

Student derivation walks the teacher's dependency graph with torch-pruning, whose channel index
mapping can grow without end on some imported graphs (a PoolFormer grew to 22.8 GB in 200 s).
``bounded`` turns such a run into an exception within a known time and memory, so the caller
can refuse with one clear line instead of hanging or taking the machine down.
"""

from __future__ import annotations

import _thread
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

POLL_S = 0.25
WALL_FACTOR = 5  # a block that waits instead of computing is stopped at 5x its bound
DEFAULT_MEMORY_CAP = 8 * 2**30  # bytes a bounded block may add, at most half of what is free
OUT_OF_MEMORY_WORDS = ("can't allocate memory", "not enough memory")


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (None when the platform does not say); on the CPU, no more
    than this process may still map under its own limit (``ulimit -v``, RLIMIT_AS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = _free_system_memory()
    left = address_space_left()
    if left is None:
        return free
    return left if free is None else min(free, left)


def _free_system_memory() -> int | None:
    if sys.platform == "win32":
        return _free_windows_memory()
    try:  # MemAvailable counts reclaimable page cache, which MemFree (SC_AVPHYS_PAGES) omits
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # neither says (not Linux)
        return None


class _MemoryStatus(ctypes.Structure):
    """Windows' MEMORYSTATUSEX, what GlobalMemoryStatusEx fills in."""

    _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32)] + [
        (name, ctypes.c_uint64) for name in ("ullTotalPhys", "ullAvailPhys", "ullTotalPageFile",
                                             "ullAvailPageFile", "ullTotalVirtual",
                                             "ullAvailVirtual", "ullAvailExtendedVirtual")
    ]  # fmt: skip


def _free_windows_memory() -> int | None:
    """Available physical memory on Windows (``ullAvailPhys``, what Task Manager calls
    available), or None when the call fails."""
    status = _MemoryStatus(dwLength=ctypes.sizeof(_MemoryStatus))
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return None
    return int(status.ullAvailPhys)


def virtual_size() -> int | None:
    """This process's mapped address space in bytes (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def address_space_left() -> int | None:
    """Bytes this process may still map under its RLIMIT_AS soft limit; None when there is
    no limit or the platform has none (Windows: no ``resource`` module)."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(0, soft - (virtual_size() or 0))


class LimitExceeded(Exception):
    """A bounded block ran past its time or memory; ``what`` is "time" or "memory"."""

    def __init__(self, what: str, message: str):
        super().__init__(message)
        self.what = what


@dataclass
class _Deadline:
    """Interrupts the main thread once the block has done ``seconds`` of work, counted as this
    process's CPU time per thread torch computes with: the same file trips it at the same point
    on an idle and a busy machine (wall time would refuse it only when a neighbour is busy). A
    block that waits rather than computes trips it at WALL_FACTOR times the bound."""

    seconds: float
    fired: str = ""  # "" until it fires: then what tripped it, e.g. "120 s of CPU time"
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self) -> None:
        threads = max(torch.get_num_threads(), 1)
        cpu_start, wall_start = time.process_time(), time.monotonic()
        while True:
            time.sleep(POLL_S)
            work = (time.process_time() - cpu_start) / threads
            wall = time.monotonic() - wall_start
            if work > self.seconds:
                self.fire(f"{work:.0f} s of work ({threads} thread(s); {wall:.0f} s wall)")
            elif wall > WALL_FACTOR * self.seconds:
                self.fire(f"{wall:.0f} s of wall time ({work:.0f} s of work)")
            with self.lock:
                if self.finished or self.fired:
                    return

    def fire(self, what: str) -> None:
        with self.lock:
            if not self.finished and not self.fired:
                self.fired = what
                _thread.interrupt_main()  # a KeyboardInterrupt in the main thread

    def finish(self) -> None:
        with self.lock:
            self.finished = True


def memory_cap(fraction_of_free: float = 0.5, at_most: int = DEFAULT_MEMORY_CAP) -> int | None:
    """Bytes a bounded block may add: half of the memory free now, at most 8 GiB (None when
    the platform does not say how much is free)."""
    free = available_memory(torch.device("cpu"))
    return None if free is None else min(at_most, int(free * fraction_of_free))


@contextmanager
def _address_space_cap(extra_bytes: int | None) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra_bytes`` (Linux and
    other systems with RLIMIT_AS; a no-op elsewhere, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        resource = None
    size = virtual_size()
    if resource is None or extra_bytes is None or size is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        yield  # already capped tighter by the user or the system
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (Python's or torch's CPU allocator, which says
    "can't allocate memory" on Linux and "not enough memory" on Windows)."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError)
        and any(words in str(error) for words in OUT_OF_MEMORY_WORDS)
    )


@contextmanager
def bounded(seconds: float | None, memory_bytes: int | None) -> Iterator[None]:
    """Run the block within ``seconds`` of work (_Deadline) and ``memory_bytes`` more address space;
    raise LimitExceeded otherwise. The time bound works in the main thread only (it interrupts
    it as Ctrl-C would, between Python bytecodes); a real Ctrl-C still propagates."""
    deadline = None
    previous_handler = None
    if seconds is not None and threading.current_thread() is threading.main_thread():
        deadline = _Deadline(seconds)
        previous_handler = signal.getsignal(signal.SIGINT)
        if not callable(previous_handler):
            # interrupt_main does nothing while SIGINT is ignored (a process started in the
            # background) or left to the OS: handle it in Python for the block's duration
            signal.signal(signal.SIGINT, signal.default_int_handler)
        threading.Thread(target=deadline.watch, daemon=True).start()
    try:
        with _address_space_cap(memory_bytes):
            yield
    except KeyboardInterrupt:
        if deadline is not None and deadline.fired:
            raise LimitExceeded(
                "time", f"took over {seconds:.0f} s (after {deadline.fired})"
            ) from None
        raise
    except Exception as error:
        if is_out_of_memory(error):
            limit = f"{memory_bytes / 2**30:.1f} GiB" if memory_bytes else "the memory"
            raise LimitExceeded("memory", f"needed more than {limit} of memory") from error
        raise
    finally:
        if deadline is not None:
            deadline.finish()  # the watcher firing from now on does nothing
            if not callable(previous_handler):
                signal.signal(signal.SIGINT, previous_handler)
