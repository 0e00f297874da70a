"""Health of a data-free run: are the generated inputs still spread over the teacher's classes,
is the teacher saturated, does the student agree with it? Measured on fresh generated batches
every few iterations; a collapse is first answered by restarting the generator, then by
stopping with ``GenerationCollapsed`` (exit code 3), never by a silent chance-level student."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress_toolbox.batching import run_in_batches
from compress_toolbox.errors import DaflWarning, TrainingFailed
from compress_toolbox.tasks.verdict import chance_agreement, falls_short

COLLAPSE_ENTROPY = 0.3  # normalised entropy of the class histogram below this = collapsed
# (two equally frequent classes out of ten give 0.30, one class gives 0)
FOUND_MIN = 0.5  # the teacher finds something in fewer than this share of inputs = collapsed
# (a detector's generated images: 0.84-1.0 per check on the detection benchmark's healthy runs)


class GenerationCollapsed(TrainingFailed):
    """The generated inputs kept collapsing onto very few of the teacher's classes."""


@dataclass
class Health:
    """One health check on fresh generated inputs."""

    iteration: int
    classes: int  # classes the teacher predicts at least once
    class_entropy: float  # normalised entropy of the teacher's class histogram, in [0, 1]
    teacher_confidence: float  # mean top-1 softmax probability (1.0 = saturated)
    agreement: float  # student-teacher top-1 agreement
    student_entropy: float  # normalised entropy of the student's class histogram
    chance_agreement: float = 0.0  # agreement of a student blind to the input (verdict.py)
    # share of inputs in which the teacher finds something (a detection above the threshold);
    # 1.0 for tasks that answer on every input
    found: float = 1.0

    def as_row(self) -> dict[str, float]:
        row = asdict(self)
        row.pop("iteration")
        return row

    def short(self) -> str:
        found = f", teacher finds objects in {self.found:.0%}" if self.found < 1 else ""
        return (
            f"classes {self.classes}, entropy {self.class_entropy:.2f}, "
            f"confidence {self.teacher_confidence:.2f}{found}, agreement {self.agreement:.2f}"
        )

    def collapsed(self) -> bool:
        """The generated inputs fall on (almost) one class, or the teacher finds nothing in
        most of them."""
        return self.class_entropy < COLLAPSE_ENTROPY or self.found < FOUND_MIN

    def collapse_text(self, num_classes: int) -> str:
        """What collapsed, for messages."""
        if self.found < FOUND_MIN:
            return f"the teacher finds nothing in {1 - self.found:.0%} of the generated inputs"
        return (f"the generated inputs collapsed onto {self.classes} of the teacher's "
                f"{num_classes} classes (normalised entropy {self.class_entropy:.2f})")  # fmt: skip


def progress_figures(losses: dict[str, float], health: Health | None,
                     accuracy: float | None) -> dict[str, str]:  # fmt: skip
    """The progress line's figures: the losses, the last health check, the monitored accuracy."""
    figures = {k[5:]: f"{v:.3f}" for k, v in losses.items()}
    if health is not None:
        figures["classes"] = str(health.classes)
        figures["agree"] = f"{health.agreement:.2f}"
    if accuracy is not None:
        figures["acc"] = f"{accuracy:.4f}"
    return figures


def class_entropy(predictions: torch.Tensor, num_classes: int) -> float:
    """Normalised entropy (0 = one class, 1 = uniform) of a vector of class indices."""
    if num_classes < 2 or predictions.numel() == 0:
        return 1.0
    counts = torch.bincount(predictions.flatten().cpu(), minlength=num_classes).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return max(0.0, entropy / math.log(num_classes))


@torch.no_grad()
def measure(
    teacher: nn.Module, student: nn.Module, x: torch.Tensor, iteration: int, num_classes: int,
    as_logits: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None,
    found: Callable[[torch.Tensor], float] | None = None,
) -> Health:
    """Health figures of the teacher and the student on inputs ``x``; ``as_logits`` turns both
    outputs into class logits first (``Task.health_logits``), ``found`` gives the share of
    inputs in which the teacher finds something (``Task.found_share``)."""
    was_training = student.training
    student.eval()
    try:
        t_logits = run_in_batches(teacher, x, len(x)).float()
        s_logits = run_in_batches(student, x, len(x)).float()
    finally:
        student.train(was_training)
    found_share = found(t_logits) if found is not None else 1.0
    if as_logits is not None:
        t_logits, s_logits = as_logits(t_logits, s_logits)
    t_pred, s_pred = t_logits.argmax(1), s_logits.argmax(1)
    return Health(
        iteration=iteration,
        classes=int(torch.unique(t_pred).numel()),
        class_entropy=class_entropy(t_pred, num_classes),
        teacher_confidence=float(F.softmax(t_logits, 1).max(1).values.mean()),
        agreement=float((t_pred == s_pred).float().mean()),
        student_entropy=class_entropy(s_pred, num_classes),
        chance_agreement=chance_agreement(t_pred, s_pred, max(num_classes, 1)),
        found=found_share,
    )


class CollapseGuard:
    """Counts consecutive collapsed checks; says when to restart the generator and when to give
    up. Checks in the first ``warmup`` iterations after a (re)start never count: a fresh
    generator needs some steps to spread over the classes (``set_warmup`` sizes it to the run)."""

    def __init__(self, patience: int = 3, max_restarts: int = 2, warmup: int = 30) -> None:
        self.patience = patience
        self.max_restarts = max_restarts
        self.warmup = warmup
        self.strikes = 0
        self.restarts = 0
        self.started = 0  # iteration of the last (re)start of the generator

    def set_warmup(self, expected_iterations: int) -> None:
        """At least 30 iterations, or 5% of the run, whichever is more."""
        self.warmup = max(self.warmup, expected_iterations // 20)

    def judge(self, health: Health) -> str:
        """'ok', 'restart' or 'fail' for this check."""
        if health.iteration < self.started + self.warmup:
            return "ok"
        if not health.collapsed():
            self.strikes = 0
            return "ok"
        self.strikes += 1
        if self.strikes < self.patience:
            return "ok"
        self.strikes = 0
        if self.restarts >= self.max_restarts:
            return "fail"
        self.restarts += 1
        self.started = health.iteration
        return "restart"

    def respond(self, health: Health, iteration: int, num_classes: int) -> str:
        """``judge``, said: a warning when the generator is to restart ("restart" returned),
        ``GenerationCollapsed`` when restarts are spent; "ok" otherwise."""
        verdict = self.judge(health)
        if verdict == "restart":
            warnings.warn(f"at iteration {iteration} {health.collapse_text(num_classes)} "
                          f"({health.short()}): restarting the generator",
                          category=DaflWarning, stacklevel=3)  # fmt: skip
        elif verdict == "fail":
            raise GenerationCollapsed(
                f"{health.collapse_text(num_classes)}, and it stayed so after "
                f"{self.restarts} generator restarts; no usable student. Check "
                f"that the teacher is a working model (here it answers mean confidence "
                f"{health.teacher_confidence:.2f}), or try another --method or --seed"
            )
        return verdict

    def state_dict(self) -> dict[str, int]:
        return {"strikes": self.strikes, "restarts": self.restarts, "started": self.started,
                "warmup": self.warmup}  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.strikes, self.restarts = int(state["strikes"]), int(state["restarts"])
        self.started, self.warmup = int(state["started"]), int(state["warmup"])


def judge_student(
    teacher_accuracy: float | None,
    student_accuracy: float | None,
    health: Health | None,
    num_classes: int | None = None,
    figure: str = "accuracy",
    trivial: float | None = None,
) -> list[str]:
    """Why the finished student is unusable (empty: it is not). With evaluation data: it
    recovers less than half of the teacher's margin over the ``trivial`` predictor
    (verdict.py; 1/K when not given). Without: no iteration ran, the generated inputs had
    collapsed at the end, or the student answers (almost) one class only or recovers less than
    half of the way from chance agreement to full agreement on generated inputs."""
    if teacher_accuracy and student_accuracy is not None:
        if trivial is None:
            trivial = 1 / num_classes if num_classes else 0.0
        if falls_short(teacher_accuracy, student_accuracy, trivial):
            return [
                f"student {figure} {student_accuracy:.4f} recovers less than half of the "
                f"teacher's {teacher_accuracy:.4f} over the trivial predictor's {trivial:.4f}"
            ]
        return []
    if health is None:
        return ["no training iteration ran, so nothing shows that the student learned"]
    if health.collapsed():
        return [f"at the end of training {health.collapse_text(num_classes or health.classes)}"]
    problems = []
    if health.student_entropy < COLLAPSE_ENTROPY:
        problems.append(
            f"the student answers almost always the same class (normalised entropy "
            f"{health.student_entropy:.2f}) where the teacher's answers spread over "
            f"{health.classes} classes"
        )
    if num_classes and falls_short(1.0, health.agreement, health.chance_agreement):
        problems.append(
            f"the student agrees with the teacher on only {health.agreement:.0%} of generated "
            f"inputs (chance, with these class frequencies: {health.chance_agreement:.0%})"
        )
    return problems


class StudentFailed(TrainingFailed):
    """The finished student is far from usable (see ``judge_student``)."""
