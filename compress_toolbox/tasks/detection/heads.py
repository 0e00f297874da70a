"""Detection head layouts: how a detector's raw output (before decoding and NMS) is laid out,
recognised from its shape.

- ``yolov8``: one output (N, 4 + K, A), anchor-free (ultralytics YOLOv8/v11 exports): per
  location a box (cx, cy, w, h) in input pixels, then K class scores already through a sigmoid.
- ``yolov5``: one output (N, A, 5 + K) (ultralytics YOLOv5 exports): box (cx, cy, w, h) in
  pixels, an objectness score, then K class scores, all already through a sigmoid.

The layouts differ in which axis holds the locations: YOLO heads have far more locations than
channels, so (N, C, A) with C < A is read as yolov8 and (N, A, C) with A > C as yolov5. Anything
else (several outputs, another rank, a square output) is refused by the task with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

YOLOV8_BOX_CHANNELS = 4  # cx, cy, w, h
YOLOV5_BOX_CHANNELS = 5  # cx, cy, w, h, objectness


@dataclass(frozen=True)
class HeadLayout:
    """One head layout and its number of classes."""

    name: str  # "yolov8" or "yolov5"
    num_classes: int

    @property
    def has_objectness(self) -> bool:
        """Whether each location carries an objectness score besides its class scores."""
        return self.name == "yolov5"

    def locations_last(self, out: torch.Tensor) -> torch.Tensor:
        """The raw output as (N, A, C): one row of channels per location."""
        return out.transpose(1, 2) if self.name == "yolov8" else out

    def boxes(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A, 4) boxes as (cx, cy, w, h) in input pixels."""
        return self.locations_last(out)[..., :4]

    def probabilities(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A, P) every score the head outputs after its sigmoid: the K class scores, with
        the objectness first for yolov5 (P = K + 1)."""
        return self.locations_last(out)[..., 4:]

    def class_scores(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A, K) the score of each class at each location (objectness times the class
        score for yolov5), as decoding ranks them."""
        rows = self.locations_last(out)
        if self.has_objectness:
            return rows[..., 4:5] * rows[..., 5:]
        return rows[..., 4:]

    def confidence(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A) each location's best class score: how sure the head is of an object there."""
        return self.class_scores(out).max(dim=-1).values


def recognise(shape: tuple[int, ...]) -> HeadLayout | None:
    """The layout of a raw output of ``shape`` (no batch), or None when none fits."""
    if len(shape) != 2:
        return None
    first, second = shape
    if YOLOV8_BOX_CHANNELS + 1 <= first < second:
        return HeadLayout("yolov8", first - YOLOV8_BOX_CHANNELS)
    if YOLOV5_BOX_CHANNELS + 1 <= second < first:
        return HeadLayout("yolov5", second - YOLOV5_BOX_CHANNELS)
    return None


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(…, 4) centre/size boxes as corners, widths and heights clamped at 0."""
    centre, size = boxes[..., :2], boxes[..., 2:].clamp_min(0)
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)
