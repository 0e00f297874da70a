"""The trainer's separate pieces: when to stop, the replay pool, CPU threads, checkpoints and
progress output. distill.py composes them into the training loop."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_toolbox.distillation.distributed import cores_per_rank
from compress_toolbox.distillation.presets import Preset
from compress_toolbox.errors import DaflError, first_line

CHECKPOINT_FORMAT = "dafl-compress-checkpoint-v2"


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the base LR at ``progress`` in [0, 1] of the planned run."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 1.0 if progress < 0.4 else 0.1 if progress < 0.8 else 0.01
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise DaflError(f"unknown LR schedule {schedule!r}")


@dataclass
class StopPolicy:
    """Stops at ``total_iters`` iterations or before ``time_budget`` seconds would be exceeded
    (by a running estimate of the iteration time), and says how far along the run is."""

    total_iters: int | None
    time_budget: float | None
    schedule_length: int | None = None  # the paper's planned iterations (schedule progress)
    fit_to_budget: bool = False  # progress = max(iterations, time) fraction of the bounds
    iteration_seconds: float = 0.0
    reserve_s: float = 0.0  # of the budget, for the run's work outside its iterations

    @classmethod
    def for_run(cls, iters: int | None, epochs: int | None, time_budget: float | None,
                preset: Preset) -> StopPolicy:  # fmt: skip
        """The run's bound: iterations, epochs or seconds as given, else the preset's default
        budget or its full schedule."""
        total, budget = iters, time_budget
        if total is None and epochs is not None:
            total = epochs * preset.iters_per_epoch
        if total is None and budget is None:
            if preset.default_time_budget is not None:
                budget = preset.default_time_budget
            else:
                total = (preset.epochs or 1) * preset.iters_per_epoch
        # Paper presets follow their own schedule length (truncated by a budget); fast fits its
        # schedule to whatever bounds the run.
        length = (preset.epochs or 0) * preset.iters_per_epoch or total
        return cls(total, budget, length, preset.fit_schedule_to_budget)

    def record(self, seconds: float, done_since_start: int) -> None:
        """Update the iteration-time estimate (the first iteration is a slow warm-up)."""
        if done_since_start == 1:
            self.iteration_seconds = 0.5 * seconds
        elif done_since_start == 2:
            self.iteration_seconds = seconds
        else:
            self.iteration_seconds = 0.8 * self.iteration_seconds + 0.2 * seconds

    def reason_to_stop(self, iteration: int, elapsed: float) -> str | None:
        if self.total_iters is not None and iteration >= self.total_iters:
            return "iterations"
        needed = elapsed + self.iteration_seconds + self.reserve_s
        if self.time_budget is not None and needed > self.time_budget:
            return "time budget"
        return None

    def progress(self, iteration: int, elapsed: float) -> float:
        if not self.fit_to_budget:
            return iteration / self.schedule_length if self.schedule_length else 0.0
        fractions = [0.0]
        if self.total_iters:
            fractions.append(iteration / self.total_iters)
        if self.time_budget:
            fractions.append(elapsed / self.time_budget)
        return max(fractions)


class ReplayPool:
    """The last generated batches (inputs and teacher logits) the student steps draw from,
    capped in memory so large inputs still fit a 4 GB GPU."""

    def __init__(self, size: int, batch_bytes: int, memory_bytes: int = 256 * 2**20) -> None:
        self.size = max(1, min(size, memory_bytes // max(batch_bytes, 1)))
        self.batches: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=self.size)

    def __len__(self) -> int:
        return len(self.batches)

    def add(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        self.batches.append((x, logits))

    def newest(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[-1]

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[int(torch.randint(len(self.batches), ()))]

    def rebatch(self, batch_size: int) -> None:
        """Cut every pooled batch into pieces of at most ``batch_size`` (after CUDA OOM)."""
        pieces = []
        for x, logits in self.batches:
            pieces += zip(x.split(batch_size), logits.split(batch_size))
        self.batches = deque(pieces[-self.size :], maxlen=self.size)

    def state(self) -> list[list[torch.Tensor]]:
        return [[x.cpu(), logits.cpu()] for x, logits in self.batches]

    def load(self, batches: list, device: torch.device) -> None:
        for x, logits in batches[-self.size :]:
            self.add(x.to(device), logits.to(device))


class ThreadChooser:
    """On a multi-core CPU with ``cpu_threads="auto"``: iterations 2-3 run on all cores, 4-5 on
    one, and the faster setting is kept. Measured: with another process busy on a 2-core
    machine, 2 OpenMP threads were up to 5x slower than 1 for these small convolutions.
    Without ``race`` (an iteration-bound run, which must give the same student whatever the
    machine's load) the setting is never decided by timings: all cores."""

    def __init__(self, device: torch.device, setting: str | int, fixed: int | None,
                 race: bool = True) -> None:  # fmt: skip
        cores = cores_per_rank()
        self.active = False
        self.times: dict[int, float] = {}
        if device.type != "cpu":
            return
        if fixed is not None:
            torch.set_num_threads(fixed)
        elif str(setting).isdigit():
            torch.set_num_threads(int(setting))
        else:
            torch.set_num_threads(cores)
            self.active = race and setting == "auto" and cores > 1

    def before(self, done: int) -> None:
        """Called before iteration ``done + 1`` of this session."""
        if not self.active:
            return
        if done == 3:
            torch.set_num_threads(1)
        elif done == 5:
            torch.set_num_threads(min(self.times, key=self.times.get))
            self.active = False

    def after(self, done: int, seconds: float) -> None:
        if self.active and done >= 2:  # the first iteration is warm-up
            threads = torch.get_num_threads()
            self.times[threads] = self.times.get(threads, 0.0) + seconds

    @property
    def settled(self) -> bool:
        return not self.active


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    # RNG states must be CPU byte tensors, but a checkpoint loaded with map_location="cuda"
    # brings them back on the GPU (seen on an H200: "RNG state must be a torch.ByteTensor")
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def module_digest(module: nn.Module) -> str:
    """A short fingerprint of a module's parameter names, shapes and values."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        if tensor.is_floating_point() and tensor.numel():
            digest.update(f"{float(tensor.double().sum()):.6e}".encode())
    return digest.hexdigest()[:16]


REQUIRED_CHECKPOINT_KEYS = (
    "format", "method", "preset", "teacher", "student", "student_optimizer", "method_state",
    "iteration", "elapsed_s", "history", "rng", "pool", "batch_size", "student_steps", "guard",
)  # fmt: skip


class Checkpointer:
    """Saves and loads training state weights-only: tensors, numbers, strings, lists and dicts.
    Nothing in a checkpoint can run code when loaded, even one planted by someone else."""

    def __init__(self, path: Path | None, every_s: float, first_s: float = 10.0) -> None:
        self.path = path
        self.every_s = every_s
        # The first one early, so that a run killed in its first minute can still resume.
        self.next_due = time.perf_counter() + min(first_s, every_s)

    def due(self) -> bool:
        return self.path is not None and time.perf_counter() >= self.next_due

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` to a temporary file, then move it over the checkpoint: a crash or a
        full disk never leaves a half-written checkpoint, and the previous one stays whole.
        DaflError naming the file when it cannot be written ("disk full" on ENOSPC)."""
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_durably(tmp, {"format": CHECKPOINT_FORMAT, **state})
            os.replace(tmp, self.path)
        except BaseException as error:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if isinstance(error, OSError):
                raise DaflError(_write_failure(self.path, error)) from None
            raise
        self.next_due = time.perf_counter() + self.every_s

    @staticmethod
    def remove(path: Path) -> None:
        """Delete the checkpoint at ``path`` (and a stray temporary), then its folder if that
        is left empty: only what this class writes, never anything else in the folder."""
        for file in (path, path.with_name(path.name + ".tmp")):
            file.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass  # not empty (someone else's files) or already gone

    def load(self, device: torch.device, expect: dict[str, Any]) -> dict[str, Any]:
        """The saved state; DaflError naming the file when it is unreadable, incomplete or made
        by another run (``expect``: key -> value that must match, e.g. method, teacher; a key
        outside REQUIRED_CHECKPOINT_KEYS is compared where the checkpoint has it, as an older
        one may not)."""
        if self.path is None or not self.path.is_file():
            raise DaflError(f"cannot resume: no checkpoint at {self.path or '(no checkpoint dir)'}")
        try:
            state = torch.load(self.path, map_location=device, weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is the user's problem
            first = first_line(error)
            raise DaflError(
                f"cannot resume: {self.path} is not a dafl-compress checkpoint that can be read "
                f"safely ({type(error).__name__}: {first})"
            ) from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise DaflError(f"cannot resume: {self.path} is not a {CHECKPOINT_FORMAT} file")
        missing = [key for key in REQUIRED_CHECKPOINT_KEYS if key not in state]
        if missing:
            raise DaflError(f"cannot resume: {self.path} lacks {', '.join(missing)}")
        for key, value in expect.items():
            if key in state and state[key] != value:
                raise DaflError(
                    f"cannot resume: checkpoint {self.path} is for {key} {state[key]}, not {value}"
                )
        return state


def _write_durably(path: Path, obj: Any) -> None:
    """``torch.save`` through a Python file, so that a failed write is an OSError with its
    errno (torch's own writer, given a path, reports a full disk as "unexpected pos"), and on
    disk before the caller renames it. A file left at ``path`` (a killed run's, or a link
    planted there) is removed, not written through."""
    path.unlink(missing_ok=True)
    with open(path, "xb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _write_failure(path: Path, error: OSError) -> str:
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (
            f"disk full: cannot write the checkpoint {path}; free some space and run again "
            "(--resume continues from the previous checkpoint, if one was written)"
        )
    return f"cannot write the checkpoint {path} ({error.strerror or error})"


class Progress:
    """A live bar on a terminal; on a file or pipe, a plain line every ``every_s`` seconds."""

    def __init__(self, enabled: bool, desc: str, total: int | None, initial: int,
                 every_s: float = 30.0) -> None:  # fmt: skip
        self.enabled = enabled
        self.desc = desc
        self.every_s = every_s
        self.bar = None
        self.last_line = time.perf_counter()
        self.total = total
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="it",
                            dynamic_ncols=True)  # fmt: skip

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, iteration: int, elapsed: float, figures: dict[str, str]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(iteration - self.bar.n)
            if figures:
                self.bar.set_postfix(figures, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            self.line(iteration, elapsed, figures)

    def line(self, iteration: int, elapsed: float, figures: dict[str, str]) -> None:
        if not self.enabled:
            return
        total = f"/{self.total}" if self.total else ""
        text = ", ".join(f"{k} {v}" for k, v in figures.items())
        message = f"{self.desc}: iteration {iteration}{total}, {elapsed:.0f} s; {text}"
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
