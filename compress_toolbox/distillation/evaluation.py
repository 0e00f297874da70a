"""The evaluation data during a run (never trained on): the teacher's answers once, the
student's accuracy on a subset about ten times per run for the curve, both scores at the end."""

from __future__ import annotations

import time

import torch
from torch import nn

from compress_toolbox.distillation.options import DistillOptions
from compress_toolbox.distillation.parts import StopPolicy
from compress_toolbox.tasks import Task
from compress_toolbox.tasks.evaldata import EvalData, evaluate, predict, score


class Evaluation:
    """Monitors a student on ``data`` (None: no evaluation, every figure None)."""

    def __init__(self, data: EvalData | None, teacher: nn.Module, task: Task,
                 device: torch.device, options: DistillOptions, stop: StopPolicy,
                 elapsed_before: float) -> None:  # fmt: skip
        self.data, self.device = data, device
        self.teacher_predictions = self.subset = None
        self.teacher_s = 0.0  # seconds the teacher took on the whole data
        if data is not None:
            start = time.perf_counter()
            self.teacher_predictions = predict(teacher, data, device=device)
            self.teacher_s = time.perf_counter() - start
            self.subset = data.subset(task.monitor_samples)
        self.every, self.interval_s = _schedule(data, options, stop)
        self.last = elapsed_before
        self.stop = stop
        self.subset_s: float | None = None  # seconds of the last evaluation of the subset

    def monitor(self, student: nn.Module, iteration: int, elapsed: float) -> float | None:
        """Student accuracy on the evaluation subset, when one is due (else None)."""
        if self.subset is None:
            return None
        due = (self.every is not None and iteration % self.every == 0) or (
            self.interval_s is not None and elapsed - self.last >= self.interval_s
        )
        if not due:
            return None
        self.last = elapsed
        return self._timed(student)

    def _timed(self, student: nn.Module) -> float:
        start = time.perf_counter()
        accuracy = evaluate(student, self.subset, device=self.device)
        self.subset_s = time.perf_counter() - start
        return accuracy

    def time_once(self, student: nn.Module) -> None:
        """Time one evaluation of the subset (its accuracy dropped) where none has run."""
        if self.subset is not None and self.subset_s is None:
            self._timed(student)

    def per_iteration_s(self) -> float:
        """An evaluation's seconds spread over the iterations between evaluations every N
        iterations (``DistillOptions.eval_every``; 0 where they are due by time, or none is
        timed yet)."""
        if self.subset_s is None or self.every is None:
            return 0.0
        return self.subset_s / self.every

    def seconds_still_due(self) -> float:
        """Seconds the curve's evaluations still due by time will take before the run stops
        (0 until one is timed, and for evaluations every N iterations,
        ``DistillOptions.eval_every``)."""
        if self.subset_s is None or self.interval_s is None or self.stop.time_budget is None:
            return 0.0
        end = self.stop.time_budget - self.stop.reserve_s
        return int(max(end - self.last, 0.0) // self.interval_s) * self.subset_s

    def final(self, student: nn.Module) -> tuple[float | None, float | None]:
        """(teacher, student) scores on the whole evaluation data."""
        if self.data is None:
            return None, None
        return (score(self.teacher_predictions, self.data.y),
                evaluate(student, self.data, device=self.device))  # fmt: skip


def _schedule(data: EvalData | None, options: DistillOptions,
              stop: StopPolicy) -> tuple[int | None, float | None]:  # fmt: skip
    """Evaluate ~10 times per run: every N iterations when the length is known, else by time;
    explicit options win."""
    every, interval = options.eval_every, options.eval_interval_s
    if data is None or every is not None or interval is not None:
        return every, interval
    if stop.total_iters is not None:
        return max(1, stop.total_iters // 10), None
    return None, (stop.time_budget or 0) / 10 or None
