"""Decoding a raw head output into detections: score threshold, class-wise NMS
(``torchvision.ops.batched_nms``), at most ``max_detections`` per image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from compress_toolbox.tasks.detection.heads import HeadLayout, cxcywh_to_xyxy

EVAL_SCORE_THRESHOLD = 0.001  # as ultralytics' validation: mAP needs the low-score tail
DETECTION_THRESHOLD = 0.25  # "the teacher's detections" (fidelity ground truth), as predict
NMS_IOU = 0.6
MAX_DETECTIONS = 100  # COCOeval's largest maxDets


@dataclass(frozen=True)
class Detections:
    """One image's detections: boxes (D, 4) as x1, y1, x2, y2 pixels, scores (D,), labels (D,)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)


@torch.no_grad()
def decode(out: torch.Tensor, layout: HeadLayout,
           score_threshold: float = EVAL_SCORE_THRESHOLD, iou: float = NMS_IOU,
           max_detections: int = MAX_DETECTIONS) -> list[Detections]:  # fmt: skip
    """Every image's detections from a raw output: each location's best class, kept above
    ``score_threshold``, then class-wise NMS at ``iou``, best ``max_detections`` kept."""
    boxes = cxcywh_to_xyxy(layout.boxes(out).float())
    scores, labels = layout.class_scores(out).float().max(dim=-1)
    return [_one_image(b, s, c, score_threshold, iou, max_detections)
            for b, s, c in zip(boxes, scores, labels)]  # fmt: skip


def _one_image(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
               threshold: float, iou: float, max_detections: int) -> Detections:  # fmt: skip
    keep = scores > threshold
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    kept = batched_nms(boxes, scores, labels, iou)[:max_detections]
    return Detections(boxes[kept], scores[kept], labels[kept])
