"""What a detection student minimises, on the raw head outputs of student and teacher.

- scores: binary cross-entropy of the student's sigmoid scores (class scores, and objectness
  for yolov5; a softmax head's probabilities, background column included) against the
  teacher's, once averaged over every location (the background must stay background) and once
  weighted by the teacher's confidence at each location;
- boxes: L1 (in units of the teacher's mean box size) plus GIoU (``torchvision.ops``), in
  decoded pixel space, weighted by the teacher's confidence; the box values of a boxes+scores
  head or of a YOLO head's levels, as the file encodes them (against anchors the file does not
  hold, or as distributions over distances; keypoints too), by L1 alone, in units of the
  teacher's mean absolute value.

Weighting by confidence keeps the thousands of background locations, whose boxes mean nothing,
from drowning the few that hold objects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from compress_toolbox.tasks.detection.heads import HeadLayout, cxcywh_to_xyxy

EPS = 1e-6


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * v) / sum(w), 0 when every weight is 0."""
    return (values * weights).sum() / weights.sum().clamp_min(EPS)


def score_loss(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """BCE of (N, A, P) student probabilities against the teacher's: mean over all locations
    plus the mean weighted by (N, A) ``weights``."""
    per_location = F.binary_cross_entropy(student.float().clamp(EPS, 1 - EPS),
                                          teacher.float().clamp(0, 1),
                                          reduction="none").sum(-1)  # fmt: skip
    return per_location.mean() + weighted_mean(per_location, weights)


def box_loss(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L1 + GIoU of (N, A, 4) centre/size boxes in pixels, weighted by (N, A) ``weights``."""
    scale = teacher[..., 2:].abs().mean().detach().clamp_min(1.0)
    l1 = (student.float() - teacher.float()).abs().sum(-1) / scale
    s_xyxy, t_xyxy = cxcywh_to_xyxy(student.float()), cxcywh_to_xyxy(teacher.float())
    giou = generalized_box_iou_loss(s_xyxy.reshape(-1, 4), t_xyxy.reshape(-1, 4),
                                    reduction="none", eps=1e-7).reshape(l1.shape)  # fmt: skip
    return weighted_mean(l1 + giou, weights)


def encoded_box_loss(student: torch.Tensor, teacher: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """L1 of (N, A, B) box values as the head encodes them, weighted by (N, A) ``weights``."""
    scale = teacher.abs().mean().detach().clamp_min(EPS)
    return weighted_mean((student.float() - teacher.float()).abs().sum(-1) / scale, weights)


def detection_kd_loss(student_out: torch.Tensor, teacher_out: torch.Tensor,
                      layout: HeadLayout) -> torch.Tensor:  # fmt: skip
    """The KD loss of a raw detection output against the teacher's (see the module)."""
    weights = layout.confidence(teacher_out).detach().float()
    scores = score_loss(layout.probabilities(student_out), layout.probabilities(teacher_out),
                        weights)  # fmt: skip
    if layout.boxes_encoded:
        return scores + encoded_box_loss(layout.box_values(student_out),
                                         layout.box_values(teacher_out), weights)  # fmt: skip
    return scores + box_loss(layout.boxes(student_out), layout.boxes(teacher_out), weights)
