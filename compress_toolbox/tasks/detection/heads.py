"""Detection head layouts: how a detector's raw output (before decoding and NMS) is laid out.

- ``yolov8``: one output (N, 4 + K, A), anchor-free (ultralytics YOLOv8/v11 exports): per
  location a box (cx, cy, w, h) in input pixels, then K class scores already through a sigmoid.
- ``yolov5``: one output (N, A, 5 + K) (ultralytics YOLOv5 exports): box (cx, cy, w, h) in
  pixels, an objectness score, then K class scores, all already through a sigmoid.
- ``boxes+scores``: two outputs, boxes (N, A, B) with B >= 4 and class scores (N, A, K), as
  SSD-style and TFLite face detectors (BlazeFace: ``regressors`` (N, 896, 16), ``classificators``
  (N, 896, 1)) give them. The import joins them along their last axis (in the file's order);
  the box values (the first four read as centre and size; keypoints may follow) are usually
  encoded against anchors the file does not hold, so they are compared as they are, location
  by location; scores are logits (read through a sigmoid) or probabilities, as the teacher
  answers.

The single-output layouts are recognised from the shape: YOLO heads have far more locations
than channels, so (N, C, A) with C < A is read as yolov8 and (N, A, C) with A > C as yolov5.
Two outputs are told apart by their names (``box``, ``reg``, ``loc`` against ``score``,
``class``, ``conf``) or, failing that, by which has four channels; ``--head`` names a layout
where this is ambiguous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from compress_toolbox.errors import DaflError

YOLOV8_BOX_CHANNELS = 4  # cx, cy, w, h
YOLOV5_BOX_CHANNELS = 5  # cx, cy, w, h, objectness
HEAD_NAMES = ("yolov8", "yolov5", "boxes+scores")
_BOX_NAME = re.compile(r"box|reg|loc|coord|delta", re.IGNORECASE)
_SCORE_NAME = re.compile(r"score|class|cls|conf|prob|logit", re.IGNORECASE)


@dataclass(frozen=True)
class HeadLayout:
    """One head layout, its number of classes and, for ``boxes+scores``, where the box values
    and scores lie in the joined output and whether the scores are logits."""

    name: str  # one of HEAD_NAMES
    num_classes: int
    box_channels: int = 4  # boxes+scores: the box output's channels (4 + keypoints, ...)
    scores_first: bool = False  # boxes+scores: the file gives the scores before the boxes
    logits: bool = False  # boxes+scores: scores are logits, read through a sigmoid
    outputs: tuple[str, ...] = ()  # boxes+scores: the file's output names, in its order

    @property
    def has_objectness(self) -> bool:
        """Whether each location carries an objectness score besides its class scores."""
        return self.name == "yolov5"

    @property
    def boxes_in_pixels(self) -> bool:
        """Whether the boxes are decoded (input pixels), so that boxes of different locations
        can be compared (NMS, GIoU); a boxes+scores head's are encoded per location."""
        return self.name != "boxes+scores"

    def locations_last(self, out: torch.Tensor) -> torch.Tensor:
        """The raw output as (N, A, C): one row of channels per location."""
        return out.transpose(1, 2) if self.name == "yolov8" else out

    def _box_rows(self, out: torch.Tensor) -> torch.Tensor:
        rows = self.locations_last(out)
        if self.name != "boxes+scores":
            return rows[..., :4]
        if self.scores_first:
            return rows[..., self.num_classes :]
        return rows[..., : self.box_channels]

    def boxes(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A, 4) boxes as (cx, cy, w, h): input pixels, or a boxes+scores head's first
        four box values."""
        return self._box_rows(out)[..., :4]

    def box_values(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A, B) every box value the head outputs (keypoints included)."""
        return self._box_rows(out)

    def probabilities(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A, P) every score the head outputs after its sigmoid: the K class scores, with
        the objectness first for yolov5 (P = K + 1)."""
        rows = self.locations_last(out)
        if self.name != "boxes+scores":
            return rows[..., 4:]
        if self.scores_first:
            scores = rows[..., : self.num_classes]
        else:
            scores = rows[..., self.box_channels :]
        return torch.sigmoid(scores) if self.logits else scores

    def class_scores(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A, K) the score of each class at each location (objectness times the class
        score for yolov5), as decoding ranks them."""
        scores = self.probabilities(out)
        return scores[..., :1] * scores[..., 1:] if self.has_objectness else scores

    def confidence(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A) each location's best class score: how sure the head is of an object there."""
        return self.class_scores(out).max(dim=-1).values

    def describe(self) -> str:
        """The layout in words, for inspect and the report."""
        if self.name != "boxes+scores":
            return f"{self.name}, {self.num_classes} classes"
        nouns = ("logit", "logits") if self.logits else ("probability", "probabilities")
        scores = nouns[self.num_classes > 1]
        return (f"boxes+scores ({', '.join(self.outputs)}): {self.box_channels} box values and "
                f"{self.num_classes} class {scores} per location")  # fmt: skip


def recognise(shape: tuple[int, ...]) -> HeadLayout | None:
    """The layout of a single raw output of ``shape`` (no batch), or None when none fits."""
    if len(shape) != 2:
        return None
    first, second = shape
    if YOLOV8_BOX_CHANNELS + 1 <= first < second:
        return HeadLayout("yolov8", first - YOLOV8_BOX_CHANNELS)
    if YOLOV5_BOX_CHANNELS + 1 <= second < first:
        return HeadLayout("yolov5", second - YOLOV5_BOX_CHANNELS)
    return None


def forced(name: str, shape: tuple[int, ...]) -> HeadLayout:
    """The single-output layout ``name`` (``--head``) on an output of ``shape`` (no batch);
    DaflError when the shape cannot hold it."""
    boxes = {"yolov8": YOLOV8_BOX_CHANNELS, "yolov5": YOLOV5_BOX_CHANNELS}.get(name)
    channels = shape[0] if name == "yolov8" else shape[-1]
    if boxes is None or len(shape) != 2 or channels <= boxes:
        raise DaflError(f"--head {name}: an output (N, {', '.join(map(str, shape))}) cannot be "
                        f"read as {name}; {describe_layouts()}")  # fmt: skip
    return HeadLayout(name, channels - boxes)


def joined(outputs: list[tuple[str, int]], logits: bool, head: str | None = None) -> HeadLayout:
    """The boxes+scores layout of two outputs joined along their last axis, given as
    (name, channels) in the file's order; DaflError when which is which cannot be told."""
    if head not in (None, "boxes+scores"):
        raise DaflError(f"--head {head} reads one output; the file has {len(outputs)} "
                        f"({', '.join(name for name, _ in outputs)}): use --head boxes+scores")
    if len(outputs) != 2:
        raise DaflError(f"{len(outputs)} outputs ({', '.join(n for n, _ in outputs)}); "
                        f"{describe_layouts()}")  # fmt: skip
    (first, c1), (second, c2) = outputs
    scores_first = _scores_first(first, c1, second, c2)
    if scores_first is None and head is not None:
        scores_first = False  # --head boxes+scores: the file's order
    if scores_first is None:
        raise DaflError(f"cannot tell the boxes from the scores among outputs {first} "
                        f"(.., {c1}) and {second} (.., {c2}); with --head boxes+scores the "
                        "first output is read as the boxes")  # fmt: skip
    box_channels, num_classes = (c2, c1) if scores_first else (c1, c2)
    if box_channels < 4:
        raise DaflError(f"the box output has {box_channels} values per location; at least 4 "
                        "(cx, cy, w, h) are needed")  # fmt: skip
    return HeadLayout("boxes+scores", num_classes, box_channels, scores_first, logits,
                      (first, second))  # fmt: skip


def _scores_first(first: str, c1: int, second: str, c2: int) -> bool | None:
    """Whether the first output holds the scores (True), the boxes (False), or None when
    neither the names nor the channel counts say."""
    box_1, box_2 = bool(_BOX_NAME.search(first)), bool(_BOX_NAME.search(second))
    score_1, score_2 = bool(_SCORE_NAME.search(first)), bool(_SCORE_NAME.search(second))
    if box_1 and score_2 and not (box_2 or score_1):
        return False
    if box_2 and score_1 and not (box_1 or score_2):
        return True
    if (c1 == 4) != (c2 == 4):
        return c2 == 4
    return None


LAYOUTS_TEXT = ("one output (N, 4 + K, A) (YOLOv8/v11) or (N, A, 5 + K) (YOLOv5), or two, "
                "boxes (N, A, 4+) and scores (N, A, K) (SSD-style)")  # fmt: skip


def describe_layouts() -> str:
    """What --task detection reads, for messages."""
    return f"--task detection reads {LAYOUTS_TEXT}"


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(…, 4) centre/size boxes as corners, widths and heights clamped at 0."""
    centre, size = boxes[..., :2], boxes[..., 2:].clamp_min(0)
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)
