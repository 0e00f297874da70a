"""Segmentation scores: mean IoU, pixel accuracy and per-class IoU from a confusion matrix.

Pixels labelled ``IGNORE_INDEX`` (255, the Pascal VOC convention) count nowhere. A class that
appears neither in the labels nor in the predictions has no IoU (NaN per class) and is left out
of the mean, as in torchvision's and mmsegmentation's evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = 255


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor,
                     num_classes: int) -> torch.Tensor:  # fmt: skip
    """(K, K) counts, rows = true class, columns = predicted class, ignored pixels left out."""
    labels = labels.flatten().long()
    predictions = predictions.flatten().long()
    keep = labels != IGNORE_INDEX
    index = labels[keep] * num_classes + predictions[keep]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


@dataclass
class SegmentationScores:
    """Scores of one model on a mask set."""

    mean_iou: float
    pixel_accuracy: float
    per_class_iou: list[float | None]  # None: the class is in neither labels nor predictions

    @classmethod
    def from_confusion(cls, matrix: torch.Tensor) -> SegmentationScores:
        matrix = matrix.double()
        true_positive = matrix.diag()
        union = matrix.sum(0) + matrix.sum(1) - true_positive
        ious = [float(tp / u) if u > 0 else None for tp, u in zip(true_positive, union)]
        present = [iou for iou in ious if iou is not None]
        total = float(matrix.sum())
        return cls(
            mean_iou=sum(present) / len(present) if present else math.nan,
            pixel_accuracy=float(true_positive.sum()) / total if total else math.nan,
            per_class_iou=ious,
        )


def score_masks(predictions: torch.Tensor, labels: torch.Tensor,
                num_classes: int) -> SegmentationScores:  # fmt: skip
    """Mean IoU, pixel accuracy and per-class IoU of predicted masks against labelled ones."""
    return SegmentationScores.from_confusion(confusion_matrix(predictions, labels, num_classes))
