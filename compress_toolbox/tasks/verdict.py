"""The one place that decides whether a finished student is usable, and how it is compared.

A student is judged by how much of the teacher's *margin over the trivial predictor* it
recovers, never by a ratio of raw scores: with 2 classes chance is 50%, which is more than half
of any teacher's accuracy, so "below half of the teacher" could not fail a coin flip. The
trivial predictor answers without looking at the input: the most frequent class of the
evaluation data (at least chance, 1/K), the majority class on every pixel for masks (scored
with the same mean IoU), or, on generated inputs, a student answering independently of the
teacher with the same class frequencies.
"""

from __future__ import annotations

import torch

from compress_toolbox.tasks.segmetrics import IGNORE_INDEX, score_masks

FAIL_BELOW = 0.5  # share of the teacher's margin under which the student failed (exit 3)
WARN_BELOW = 0.9  # share under which report.md warns that the student falls short


def trivial_score(labels: torch.Tensor, num_classes: int) -> float:
    """Score of the best input-blind predictor on ``labels``: for class labels (N,) the
    majority class's frequency (at least 1/K); for masks (N, H, W) the mean IoU of answering
    the majority class on every pixel."""
    valid = labels[labels != IGNORE_INDEX] if labels.dim() > 1 else labels
    if valid.numel() == 0:
        return 1 / max(num_classes, 1)
    counts = torch.bincount(valid.flatten().long(), minlength=num_classes)
    majority = int(counts.argmax())
    if labels.dim() == 1:
        return max(1 / max(num_classes, 1), float(counts[majority]) / valid.numel())
    return score_masks(torch.full_like(labels, majority), labels, num_classes).mean_iou


def chance_agreement(teacher_pred: torch.Tensor, student_pred: torch.Tensor,
                     num_classes: int) -> float:  # fmt: skip
    """Agreement expected of a student answering independently of the teacher with its own
    class frequencies: sum over classes of p_teacher(c) * p_student(c)."""
    if teacher_pred.numel() == 0:
        return 0.0
    t = torch.bincount(teacher_pred.flatten().cpu(), minlength=num_classes).double()
    s = torch.bincount(student_pred.flatten().cpu(), minlength=num_classes).double()
    return float((t / t.sum() * s / s.sum()).sum())


def share_of_margin(teacher: float, student: float, trivial: float) -> float | None:
    """(student - trivial) / (teacher - trivial); None when the teacher itself does no better
    than the trivial predictor (nothing to recover)."""
    margin = teacher - trivial
    return None if margin <= 1e-9 else (student - trivial) / margin


def falls_short(teacher: float, student: float, trivial: float, below: float = FAIL_BELOW) -> bool:
    """Whether the student recovers less than ``below`` of the teacher's margin."""
    share = share_of_margin(teacher, student, trivial)
    return share is not None and share < below
