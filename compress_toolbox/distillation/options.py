"""What ``distill`` takes and gives: ``DistillOptions`` (checked by ``validate``),
``DistillResult``, the device choice and the history file."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress_toolbox.distillation.health import Health
from compress_toolbox.distillation.methods import get_method
from compress_toolbox.distillation.presets import Preset, get_preset
from compress_toolbox.distillation.recipe import Recipe
from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError
from compress_toolbox.tasks import Task, get_task

if TYPE_CHECKING:
    from compress_toolbox.distillation.race import RaceOutcome

CHOOSERS = ("auto", "race")  # --method values that choose a registered method


class DistillInterrupted(DaflError):
    """Training was interrupted (Ctrl-C or SIGTERM); a checkpoint was written if possible."""

    exit_code = 130


@dataclass
class DistillOptions:
    """How to train. Every field is checked by ``validate`` before any work starts."""

    method: str = "auto"  # a registered method name (methods/), "auto" or "race" (race.py)
    task: str | Task = "classification"  # tasks/: what the teacher's output means
    preset: str | Preset = "fast"
    device: str | None = None  # None/"auto": cuda when available, else cpu
    time_budget: float | None = None  # seconds of training
    iters: int | None = None
    epochs: int | None = None  # x preset.iters_per_epoch iterations
    batch_size: int | None = None
    seed: int = 0
    threads: int | None = None  # CPU threads; None: the preset's choice
    fine_tune: bool = False  # the student starts from the teacher's weights
    domain: InputDomain = field(default_factory=InputDomain)
    checkpoint_dir: Path | None = None
    checkpoint_every_s: float = 60.0
    resume: bool = False
    progress: bool = True
    history_path: Path | None = None
    eval_every: int | None = None  # evaluate every N iterations ...
    eval_interval_s: float | None = None  # ... or every N seconds (default: ~10 per run)
    health_every: int = 10  # iterations between health checks

    def validate(self) -> Preset:
        """Raise DaflError for any bad value; return the resolved preset."""
        preset = get_preset(self.preset).check()
        get_task(self.task)
        if self.method not in CHOOSERS:
            get_method(self.method)
        if self.batch_size is not None and self.batch_size < 2:
            raise DaflError(f"batch size must be at least 2 (BatchNorm), got {self.batch_size}")
        for name in ("time_budget", "iters", "epochs", "threads"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise DaflError(f"{name.replace('_', ' ')} must be a positive number, got {value}")
        if sum(v is not None for v in (self.time_budget, self.iters, self.epochs)) > 1:
            raise DaflError("give at most one of time budget, iterations and epochs")
        resolve_device(self.device)
        return preset


@dataclass
class DistillResult:
    """What ``distill`` returns. ``student`` is the last one trained (never selected on labels)."""

    student: nn.Module
    history: list[dict[str, Any]]
    iterations: int
    elapsed_s: float
    device: str
    method: str
    method_reason: str  # why this method, and ``method_note``
    preset: str
    recipe: Recipe
    preset_changes: dict[str, Any] = field(default_factory=dict)  # from the named preset
    generator: nn.Module | None = None
    sampler: Callable[[int], torch.Tensor] | None = None  # fresh generated inputs
    teacher_accuracy: float | None = None  # on the whole evaluation set
    student_accuracy: float | None = None  # likewise (the curve in history uses a subset)
    teacher_predictions: torch.Tensor | None = None  # top-1 classes on the evaluation set
    stop_reason: str = ""
    health: Health | None = None  # the last check
    restarts: int = 0  # generator restarts after collapses
    num_classes: int = 0  # the teacher's output classes
    world_size: int = 1  # ranks that trained together (global batch = world_size x batch)
    method_state: dict[str, Any] = field(default_factory=dict)  # Method.state_dict() at the end
    race: RaceOutcome | None = None  # how --method race chose the method
    method_note: str | None = None  # how the method adapted to the teacher and student

    @property
    def batch_size(self) -> int:
        return self.recipe.batch_size


@dataclass(frozen=True)
class WarmStart:
    """Trained state a run starts from instead of afresh (the race's winner goes on from its
    leg): the student's and the method's ``state_dict``."""

    student: dict[str, torch.Tensor]
    method: dict[str, Any]


def with_note(reason: str, note: str | None) -> str:
    """A method's ``reason`` with its ``note`` (``Method.note``) after it, where it has one."""
    return reason if note is None else f"{reason}; {note}"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/"auto" -> cuda when available, else cpu; anything else must name a usable device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DaflError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DaflError(f"device {device!r} requested but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise DaflError(f"device {device!r} is not supported; use auto, cpu or cuda[:N]")
    return resolved


def write_history_csv(history: list[dict[str, Any]], path: str | Path) -> None:
    """One row per iteration: iteration, elapsed_s, the method's losses, loss_kd, accuracy and,
    where a health check ran, its figures (empty cells elsewhere)."""
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in columns})




def interruption(iteration: int, checkpoint: Path | None, world) -> DistillInterrupted:
    """The error a run interrupted at ``iteration`` raises: where its checkpoint is, if any."""
    if checkpoint is not None:
        return DistillInterrupted(
            f"interrupted at iteration {iteration}; checkpoint saved to {checkpoint}: rerun the "
            "same command with --resume to continue"
        )
    if not world.is_writer:
        return DistillInterrupted(
            f"interrupted at iteration {iteration} (rank {world.rank}; rank 0 saves the "
            "checkpoint)"
        )
    return DistillInterrupted(
        f"interrupted at iteration {iteration}; no checkpoint (give a checkpoint folder to be "
        "able to resume)"
    )
