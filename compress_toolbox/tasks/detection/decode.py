"""Decoding a raw head output into detections: score threshold, class-wise NMS
(``torchvision.ops.batched_nms``), at most ``max_detections`` per image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.ops import batched_nms

from compress_toolbox.tasks.detection.heads import HeadLayout, cxcywh_to_xyxy

EVAL_SCORE_THRESHOLD = 0.001  # as ultralytics' validation: mAP needs the low-score tail
DETECTION_THRESHOLD = 0.25  # "the teacher's detections" (fidelity ground truth), as predict
NMS_IOU = 0.6
MAX_DETECTIONS = 100  # COCOeval's largest maxDets
SIDE, SPREAD = 4.0, 1000.0  # encoded boxes: a location's side and the gap between locations


@dataclass(frozen=True)
class Detections:
    """One image's detections: boxes (D, 4) as x1, y1, x2, y2 pixels, scores (D,), labels (D,)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, threshold: float) -> Detections:
        """Only the detections scoring above ``threshold``."""
        keep = self.scores > threshold
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])


@dataclass(frozen=True)
class Decoding:
    """How raw outputs become detections: the built-in reading of ``layout`` (``decode``) or,
    with ``user`` (a ``user_decode.UserDecoder``, --decode), the user's own function."""

    layout: HeadLayout
    user: Any = None

    @property
    def in_pixels(self) -> bool:
        """Whether the detections' boxes are in input pixels (comparable with labels, drawable);
        not for boxes encoded against anchors that only the user's decoding knows."""
        return self.user is not None or self.layout.boxes_in_pixels

    @property
    def by(self) -> str:
        """Who decodes, for the report."""
        return f"--decode {self.user.name}" if self.user is not None else "the built-in decoding"

    def __call__(self, out: torch.Tensor, image_size: tuple[int, int],
                 threshold: float = EVAL_SCORE_THRESHOLD,
                 box_scale: float | None = None) -> list[Detections]:  # fmt: skip
        """Every image's detections above ``threshold`` (``box_scale``: see ``decode``)."""
        if self.user is None:
            return decode(out, self.layout, threshold, box_scale=box_scale)
        return [found.above(threshold) for found in self.user(out, self.layout, image_size)]


@torch.no_grad()
def decode(out: torch.Tensor, layout: HeadLayout,
           score_threshold: float = EVAL_SCORE_THRESHOLD, iou: float = NMS_IOU,
           max_detections: int = MAX_DETECTIONS, box_scale: float | None = None
           ) -> list[Detections]:  # fmt: skip
    """Every image's detections from a raw output: each location's best class, kept above
    ``score_threshold``, then class-wise NMS at ``iou``, best ``max_detections`` kept. Boxes
    encoded per location are placed apart (``per_location_boxes``, at ``box_scale``)."""
    boxes = layout.boxes(out).float()
    if not layout.boxes_in_pixels:
        boxes = per_location_boxes(boxes, box_scale or encoded_scale(boxes))
    boxes = cxcywh_to_xyxy(boxes)
    scores, labels = layout.class_scores(out).float().max(dim=-1)
    return [_one_image(b, s, c, score_threshold, iou, max_detections)
            for b, s, c in zip(boxes, scores, labels)]  # fmt: skip


def encoded_scale(boxes: torch.Tensor) -> float:
    """The typical size of encoded box values: their mean absolute value."""
    return float(boxes.abs().mean().clamp_min(1e-6))


def per_location_boxes(values: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, A, 4) box values encoded per location (anchors not in the file) as comparable
    centre/size boxes: each location's own box, of side ``SIDE * scale`` plus its size values,
    centred at its centre values, the locations set far apart. Two models' boxes (decoded at
    the same ``scale``) then overlap only at one location, and their IoU falls as their values
    part: about 0.5 when the centre values differ by 1.3 ``scale``."""
    locations = torch.arange(values.shape[1], dtype=values.dtype, device=values.device)
    centre_x = values[..., 0] + locations * (SPREAD * scale)
    sizes = (values[..., 2:4] + SIDE * scale).clamp_min(0.1 * scale)
    return torch.stack([centre_x, values[..., 1], sizes[..., 0], sizes[..., 1]], dim=-1)


def _one_image(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
               threshold: float, iou: float, max_detections: int) -> Detections:  # fmt: skip
    keep = scores > threshold
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    kept = batched_nms(boxes, scores, labels, iou)[:max_detections]
    return Detections(boxes[kept], scores[kept], labels[kept])
