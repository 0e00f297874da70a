"""Stage 3, distill: the training loop (``trainer``) and its parts (``parts``: stopping, replay
pool, threads, checkpoints, progress), the recipe sized to the machine (``recipe``, ``presets``),
the run's health (``health``), several processes (``distributed``, ``local_launch``), and the
data-free methods (``methods/``) with their generator and losses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

from torch import nn

from compress_toolbox.distillation.options import DistillOptions, DistillResult
from compress_toolbox.distillation.trainer import Trainer
from compress_toolbox.load.teacher import Teacher
from compress_toolbox.tasks.evaldata import EvalData


def distill(
    teacher: Teacher,
    student: nn.Module,
    options: DistillOptions | None = None,
    *,
    eval_data: EvalData | None = None,
    on_iteration: Callable[[int], None] | None = None,
    **changes: Any,
) -> DistillResult:
    """Train ``student`` (in place) to mimic ``teacher`` without data.

    ``options`` (a ``DistillOptions``) or keyword arguments naming its fields (``method``: a
    registered method, ``auto`` or ``race``,
    ``preset``, ``time_budget``, ``iters``, ...) say how; with no budget the preset's default
    (the full paper schedule, or the fast preset's 120 s). ``eval_data`` is for monitoring and
    the result's accuracy only, never for training. ``on_iteration`` is called after each
    iteration with its number. Raises DaflError for bad options, TrainingFailed when training
    produces no usable student, DistillInterrupted on Ctrl-C (after saving a checkpoint).
    """
    options = options or DistillOptions()
    known = {f.name for f in fields(DistillOptions)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"distill() got unknown option(s): {', '.join(unknown)}")
    options = replace(options, **changes)
    if options.method == "race":
        from compress_toolbox.distillation.race import distill_by_race

        return distill_by_race(teacher, student, options, eval_data, on_iteration)
    return Trainer(teacher, student, options, eval_data, on_iteration).run()
