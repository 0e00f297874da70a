"""Detection head layouts: how a detector's raw output (before decoding and NMS) is laid out.

- ``yolov8``: one output (N, 4 + K, A), anchor-free (ultralytics YOLOv8/v11 exports): per
  location a box (cx, cy, w, h) in input pixels, then K class scores already through a sigmoid.
- ``yolov5``: one output (N, A, 5 + K) (ultralytics YOLOv5 exports): box (cx, cy, w, h) in
  pixels, an objectness score, then K class scores, all already through a sigmoid. Or the
  head's levels before decoding, one output each, (N, anchors, h, w, 5 + K) (YOLOv7's export
  without ``--grid``) or the convolutions' own (N, anchors * (5 + K), h, w) (YOLOv5 forks for
  edge NPUs): the import joins their rows along the locations (``tasks.outputs.level_rows``);
  the box values are encoded against the grid and anchors, compared as they are, location by
  location, and the scores are logits (read through a sigmoid) or probabilities, as the
  teacher answers. With ``--head yolov8``, a YOLOv8 head's levels, (N, 64 + K, h, w): 64
  values of a distribution over 16 distances per side (DFL), then K class scores, per cell;
  or, without ``--head``, the same levels given in parts (Rockchip's exports: (N, 64, h, w),
  (N, K, h, w) and a score sum (N, 1, h, w) per level; YOLOv6's box as (N, 68, h, w)
  distributions or (N, 4, h, w) distances), joined per level along the channels, the sum
  carried, not read. Where the input size places their cells (``with_pyramid``), these
  distances decode to boxes in input pixels, as ultralytics decodes them.
  Or the decoded output followed by the levels it was decoded from, (N, anchors, h, w, 5 + K)
  each (YOLOv5/v7 in eval mode through a plain ``torch.onnx.export``): the import puts each
  location's raw row beside its decoded one, (N, A, 2 (5 + K)); the decoded half is read and
  distilled, the raw half is carried (the derived student computes both as the teacher does).
- ``boxes+scores``: two outputs, boxes (N, A, B) with B >= 4 and class scores (N, A, K), as
  SSD-style and TFLite face detectors (BlazeFace: ``regressors`` (N, 896, 16), ``classificators``
  (N, 896, 1)) give them, or three with a centre-ness (N, A, 1) as FCOS's raw head
  (``cls_logits``, ``bbox_regression``, ``bbox_ctrness``). The import joins them along their
  last axis (in the file's order); the box values (the first four read as centre and size;
  keypoints may follow) are usually encoded against anchors the file does not hold, so they
  are compared as they are, location by location; scores are logits (read through a sigmoid)
  or probabilities, as the teacher answers, and a class's score at a location is the geometric
  mean of its class score and the centre-ness where there is one (as FCOS ranks them). The
  keypoints may come as a third output of their own (RetinaFace's ``landms``), read with the
  box values. Or four or more outputs, each level's boxes and scores as rows (N, A_l, C)
  (PaddleDetection's PicoDet: ``tasks.outputs.row_level_groups``), joined per level, then
  along the locations. Box values that are distributions over 8, 16 or 17 distances per side
  (32, PicoDet's; 64, KerasCV's YOLOV8Detector; 68) at locations that are one pyramid of
  cells for the input size decode to pixels as a YOLOv8 head's levels do. Scores that are a
  softmax over a background column and the K classes (SSD's, RetinaFace's ``conf``:
  probabilities summing to one, or ``--head ssd`` for such logits) rank a class by its
  softmax probability, the background column left out: the first, or the last
  (MMDetection's SSD) where the teacher's answers show it (``background_last``).

The single-output layouts are recognised from the shape: YOLO heads have far more locations
than channels, so (N, C, A) with C < A is read as yolov8 and (N, A, C) with A > C as yolov5.
Several outputs are told apart by their names (``ctr``, ``centerness``, ``quality`` for the
centre-ness, then ``score``, ``class``, ``conf`` for the scores, then ``box``, ``reg``,
``loc``) or, failing that, by their channels (four for the boxes, one for a third output's
centre-ness; of a head given as rows per level, a box output of distributions, 32, 64 or 68
values, beside its scores); ``--head`` names a layout where this is ambiguous.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from compress_toolbox.errors import DaflError
from compress_toolbox.tasks.outputs import (
    channels_first,
    channels_last,
    level_cells,
    level_locations,
    level_output,
    level_slices,
    row_channels,
    row_level_groups,
)

YOLOV8_BOX_CHANNELS = 4  # cx, cy, w, h
YOLOV5_BOX_CHANNELS = 5  # cx, cy, w, h, objectness
DFL_CHANNELS = 64  # a YOLOv8 level's box: 16 logits of a distance distribution per side
# A level's box part given on its own (Rockchip's exports): 4 distances to the sides (YOLOv6n/s;
# read only beside two or more classes: (4, 1, 1) may be YOLOX's box, objectness and class), or
# distributions over 16 distances per side (YOLOv8's DFL) or 17 (YOLOv6m/l's)
BOX_PART_CHANNELS = (4, DFL_CHANNELS, 68)
# A box output of distributions over 8 (PicoDet's), 16 (YOLOv8's) or 17 (GFL's) distances per side
DISTRIBUTION_CHANNELS = (32, DFL_CHANNELS, 68)
HEAD_NAMES = ("yolov8", "yolov5", "boxes+scores", "ssd")  # ssd: boxes+scores with a background
_BOX_NAME = re.compile(r"box|reg|loc|coord|delta", re.IGNORECASE)
_SCORE_NAME = re.compile(r"score|class|cls|conf|prob|logit", re.IGNORECASE)
_QUALITY_NAME = re.compile(r"ctr|cent(er|re)ness|quality|(?<![a-z])iou(?![a-z])", re.IGNORECASE)
_KEYPOINT_NAME = re.compile(r"landm|keypoint|kps|lmk", re.IGNORECASE)
BOXES, SCORES, QUALITY, KEYPOINTS = "boxes", "scores", "quality", "keypoints"  # boxes+scores parts


@dataclass(frozen=True)
class HeadLayout:
    """One head layout, its number of classes and, for ``boxes+scores``, which part of the
    joined output each of the file's outputs is and whether the scores are logits."""

    name: str  # one of HEAD_NAMES
    num_classes: int
    box_channels: int = 4  # boxes+scores: the box output's channels (4 + keypoints, ...);
    # yolov8 per level: 64, a distribution over 16 distances for each side (DFL); in parts:
    # one of BOX_PART_CHANNELS
    parts: tuple[str, ...] = (BOXES, SCORES)  # boxes+scores: each output's part, file order
    logits: bool = False  # boxes+scores, levels: scores are logits, read through a sigmoid
    outputs: tuple[str, ...] = ()  # boxes+scores, levels, beside: the file's output names
    keypoint_channels: int = 0  # boxes+scores: a keypoints output's channels (RetinaFace's)
    background: bool = False  # boxes+scores: scores are a softmax, column 0 the background ...
    background_last: bool = False  # ... or the last column (MMDetection's SSD)
    levels: tuple[tuple[int, ...], ...] = ()  # per level: each output's shape (no batch),
    # channels first (C, h, w) also where the file gives (h, w, C): ``channels_last``
    channels_last: bool = False  # levels: the file gives each as (N, h, w, C) (Keras)
    level_parts: tuple[int, ...] = ()  # levels given in parts: each part's channels, in order
    beside: tuple[tuple[int, ...], ...] = ()  # yolov5 decoded: its levels' shapes (no batch)
    pyramid: tuple[tuple[int, int, int], ...] = ()  # boxes as distances to the sides about
    # cells the input size places (``with_pyramid``): per level (h, w, stride in pixels)
    row_shapes: tuple[tuple[int, int], ...] = ()  # boxes+scores given per level as rows: each
    # output's (A_l, C), in the file's order (``tasks.outputs.row_level_groups``)

    @property
    def carried(self) -> int:
        """Channels per row after the head's own that the file gives and nobody reads (a
        Rockchip export's score sum), carried through to the student."""
        return sum(self.level_parts) - self.row if self.level_parts else 0

    @property
    def has_objectness(self) -> bool:
        """Whether each location carries an objectness (yolov5) or centre-ness score besides
        its class scores."""
        return self.name == "yolov5" or QUALITY in self.parts

    def part_sizes(self) -> list[int]:
        """boxes+scores: each output's channels, in the file's order."""
        sizes = {BOXES: self.box_channels, SCORES: self.num_classes + int(self.background),
                 QUALITY: 1, KEYPOINTS: self.keypoint_channels}  # fmt: skip
        return [sizes[part] for part in self.parts]

    def with_background(self, last: bool = False) -> HeadLayout:
        """This boxes+scores layout with its first (``last``: its last) score column read as
        the background of a softmax (SSD, RetinaFace; MMDetection's SSD): one class fewer.
        DaflError where that cannot be."""
        if self.num_classes < 2 or QUALITY in self.parts:
            raise DaflError(f"scores of {self.num_classes} column(s)"
                            f"{' with a centre-ness' if QUALITY in self.parts else ''} cannot "
                            "be a softmax over a background and the classes")  # fmt: skip
        return replace(self, background=True, background_last=last,
                       num_classes=self.num_classes - 1)  # fmt: skip

    def _part(self, rows: torch.Tensor, part: str) -> torch.Tensor:
        """A boxes+scores head's ``part`` of the joined rows (N, A, C)."""
        sizes, index = self.part_sizes(), self.parts.index(part)
        start = sum(sizes[:index])
        return rows[..., start : start + sizes[index]]

    def file_outputs(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The raw output as the file gives it: a boxes+scores head's joined rows split again
        into its outputs (in the file's order), a YOLO head's rows into its levels' outputs
        (given in parts: each level's parts), a decoded output's rows and their levels' beside
        them into both; a single output as it is."""
        if self.levels:
            levels = _level_outputs(out, self.levels, self.channels_last)
            if not self.level_parts:
                return levels
            return tuple(part for level in levels
                         for part in level.split(list(self.level_parts), dim=1))  # fmt: skip
        if self.beside:
            return (out[..., : self.row], *_level_outputs(out[..., self.row :], self.beside))
        if self.name != "boxes+scores":
            return (out,)
        if self.row_shapes:
            return self._row_outputs(out)
        return tuple(out.split(self.part_sizes(), dim=-1))

    @property
    def row_levels(self) -> list[tuple[int, list[int]]]:
        """A head given per level as rows: each level's rows and the indices of its outputs in
        the file's order, the level of most rows first (``tasks.outputs.row_level_groups``)."""
        levels = row_level_groups([(1, *shape) for shape in self.row_shapes]) or []
        return [(self.row_shapes[level[0]][0], level) for level in levels]

    def _row_outputs(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Joined rows of a head given per level as rows, split back into the file's outputs
        (each level's rows, then its outputs along the channels), in the file's order."""
        levels = self.row_levels
        pieces: dict[int, torch.Tensor] = {}
        for (_, level), rows in zip(levels, out.split([rows for rows, _ in levels], dim=1)):
            sizes = [self.row_shapes[i][1] for i in level]
            pieces.update(zip(level, rows.split(sizes, dim=-1)))
        return tuple(pieces[i] for i in range(len(self.row_shapes)))

    @property
    def boxes_in_pixels(self) -> bool:
        """Whether ``boxes`` gives input pixels, so that boxes of different locations can be
        compared (NMS, GIoU): decoded outputs, or distances about the cells of a known
        ``pyramid``; other boxes+scores heads' and YOLO heads' levels (with anchors, or on
        grids that do not tile the input) are encoded per location."""
        return bool(self.pyramid) or not self.boxes_encoded

    @property
    def boxes_encoded(self) -> bool:
        """Whether the file gives its box values encoded per location (a boxes+scores head, a
        YOLO head's levels), which the KD loss compares as they are."""
        return self.name == "boxes+scores" or bool(self.levels)

    def locations(self, shape: tuple[int, ...]) -> int:
        """A, the locations of a raw output of ``shape`` (no batch)."""
        return shape[-1] if self.name == "yolov8" else shape[0]

    @property
    def row(self) -> int:
        """A YOLO head's values per location: box values, objectness (yolov5), classes
        (YOLO layouts only)."""
        return self.box_channels + int(self.name == "yolov5") + self.num_classes

    @property
    def anchors(self) -> int:
        """Per level: the anchor slots per cell (a (N, na, h, w, C) output says it; one of
        (N, na * C, h, w), this layout's reading of its channels). Per-level layouts only."""
        if self.level_parts:
            return 1
        shape = self.levels[0]
        return shape[0] if len(shape) == 4 else shape[0] // self.row

    @property
    def file_levels(self) -> tuple[tuple[int, ...], ...]:
        """Per level: the output's shape (no batch) as the file gives it."""
        if not self.channels_last:
            return self.levels
        return tuple(channels_last(shape) for shape in self.levels)

    def locations_last(self, out: torch.Tensor) -> torch.Tensor:
        """The raw output as (N, A, C): one row of channels per location (per level: per
        anchor slot and cell, a cell's row of (N, na * C, h, w) read as its anchors'; the
        ``carried`` channels left out)."""
        if self.levels:
            rows = out.reshape(out.shape[0], -1, self.row + self.carried)
            return rows[..., : self.row] if self.carried else rows
        if self.beside:  # the decoded half
            return out[..., : self.row]
        return out.transpose(1, 2) if self.name == "yolov8" else out

    def _box_rows(self, out: torch.Tensor) -> torch.Tensor:
        rows = self.locations_last(out)
        if self.name != "boxes+scores":
            return rows[..., : self.box_channels]
        parts = [BOXES, KEYPOINTS] if KEYPOINTS in self.parts else [BOXES]
        return torch.cat([self._part(rows, part) for part in parts], dim=-1)

    def boxes(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A, 4) boxes as (cx, cy, w, h): input pixels, or a boxes+scores head's first
        four box values, or a YOLOv8 level's distances from its cell's centre to each side
        (their distributions, or the distances themselves as YOLOv6n gives them) as a box
        about its cell (in strides; in pixels where the ``pyramid`` is known)."""
        if self.pyramid or self.name == "yolov8" and self.levels:
            sides = self._box_rows(out)
            about = _box_about_cell(_expected_distances(sides) if self.box_channels > 4 else sides)
            return _in_pixels(about, self.pyramid) if self.pyramid else about
        return self._box_rows(out)[..., :4]

    def box_values(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A, B) every box value the head outputs (keypoints included, also from an
        output of their own)."""
        return self._box_rows(out)

    def probabilities(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A, P) every score the head outputs after its sigmoid (softmax): the K class
        scores, with the objectness (yolov5), centre-ness or background first where there is
        one (P = K + 1; a background may come last, ``background_last``)."""
        rows = self.locations_last(out)
        if self.name != "boxes+scores":
            scores = rows[..., self.box_channels :]
            return torch.sigmoid(scores) if self.logits else scores
        if self.background:
            scores = self._part(rows, SCORES)
            return scores.softmax(dim=-1) if self.logits else scores
        parts = [QUALITY, SCORES] if QUALITY in self.parts else [SCORES]
        scores = torch.cat([self._part(rows, part) for part in parts], dim=-1)
        return torch.sigmoid(scores) if self.logits else scores

    def class_scores(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A, K) the score of each class at each location, as decoding ranks them:
        objectness times the class score for yolov5, the geometric mean of centre-ness and
        class score with a centre-ness (FCOS), the softmax probability without the background
        column (SSD)."""
        scores = self.probabilities(out)
        if self.background:
            return scores[..., :-1] if self.background_last else scores[..., 1:]
        if not self.has_objectness:
            return scores
        product = scores[..., :1] * scores[..., 1:]
        return product if self.name == "yolov5" else product.clamp_min(0).sqrt()

    def confidence(self, out: torch.Tensor) -> torch.Tensor:
        """(N, A) each location's best class score: how sure the head is of an object there."""
        return self.class_scores(out).max(dim=-1).values

    def describe(self) -> str:
        """The layout in words, for inspect and the report."""
        if self.beside:
            return (f"{self.name}, {self.num_classes} classes ({self.outputs[0]}), with the "
                    f"levels it is decoded from beside it ({', '.join(self.outputs[1:])}: "
                    "carried, not read)")  # fmt: skip
        if self.name != "boxes+scores" and not self.levels:
            return f"{self.name}, {self.num_classes} classes"
        nouns = ("logit", "logits") if self.logits else ("probability", "probabilities")
        scores = f"{self.num_classes} class {nouns[self.num_classes > 1]}"
        if self.level_parts:
            return self._describe_parts(scores)
        if self.levels:
            shapes = ", ".join(f"{name} (N, {', '.join(map(str, shape))})"
                               for name, shape in zip(self.outputs, self.file_levels))  # fmt: skip
            if self.name == "yolov8":
                return (f"yolov8 per level ({shapes}): 64 box-distribution values (16 per "
                        f"side) and {scores} per cell{self._strides(' of strides ')}")  # fmt: skip
            return (f"yolov5 per level ({shapes}): {self.anchors} anchor(s) per cell, 4 "
                    f"encoded box values, an objectness and {scores} per anchor and "
                    "cell")  # fmt: skip
        if self.background:
            scores += (" before a background column (softmax, background last)"
                       if self.background_last else " after a background column (softmax)")
        if QUALITY in self.parts:
            scores += " and a centre-ness"
        boxes = f"{self.box_channels} box values"
        if self.pyramid:
            boxes = (f"{self.box_channels} box-distribution values ({self.box_channels // 4} "
                     f"per side, about cells of strides {self._strides()})")  # fmt: skip
        if KEYPOINTS in self.parts:
            boxes += f", {self.keypoint_channels} keypoint values"
        return (f"boxes+scores ({', '.join(self.outputs)}): {boxes} and {scores} per "
                f"location")  # fmt: skip

    def _describe_parts(self, scores: str) -> str:
        """A YOLOv8 head's levels in parts in words: each level's outputs and grid."""
        n = len(self.level_parts)
        levels = [f"{', '.join(self.outputs[i * n : (i + 1) * n])} ({shape[1]}x{shape[2]})"
                  for i, shape in enumerate(self.levels)]  # fmt: skip
        carried = ", then a score sum (carried, not read)" if self.carried else ""
        boxes = "4 distances to the box's sides"
        if self.box_channels > 4:
            bins = self.box_channels // 4
            boxes = f"{self.box_channels} box-distribution values ({bins} per side)"
        return (f"yolov8 per level in parts ({'; '.join(levels)}): {boxes}, "
                f"{scores}{carried} per cell{self._strides(' of strides ')}")  # fmt: skip

    def _strides(self, prefix: str = "") -> str:
        """The pyramid's strides in words, after ``prefix``; empty where it is not known."""
        if not self.pyramid:
            return ""
        return prefix + ", ".join(str(stride) for _, _, stride in self.pyramid)


def per_level(outputs: list[tuple[str, tuple[int, ...]]], head: str | None = None) -> HeadLayout:
    """The layout of a YOLO head's per-level outputs, given as (name, shape without the batch,
    channels first) in the file's order (``tasks.outputs.levels_joinable``; channels-last
    ones: ``joined_layout``): yolov5 (anchors as
    ``anchors_per_cell`` reads them), or with ``head`` yolov8, (N, 64 + K, h, w) with its box
    distributions; DaflError where ``head`` names another layout or cannot fit."""
    names = ", ".join(name for name, _ in outputs)
    levels = tuple(tuple(shape) for _, shape in outputs)
    common = {"outputs": tuple(name for name, _ in outputs), "levels": levels}
    if head == "yolov8":
        if len(levels[0]) != 3 or levels[0][0] <= DFL_CHANNELS:
            raise DaflError(f"--head yolov8: the outputs {names} are not a YOLOv8 head's levels, "
                            "(N, 64 + K, h, w) each")  # fmt: skip
        return HeadLayout("yolov8", levels[0][0] - DFL_CHANNELS, DFL_CHANNELS, **common)
    if head not in (None, "yolov5"):
        raise DaflError(f"--head {head}: the outputs {names} are a YOLO head's levels, read as "
                        "yolov5, or with --head yolov8 as YOLOv8's")  # fmt: skip
    return HeadLayout("yolov5", row_channels(levels[0]) - YOLOV5_BOX_CHANNELS, **common)


def in_parts(outputs: list[tuple[str, tuple[int, ...]]], head: str | None = None) -> HeadLayout:
    """The layout of a YOLOv8-style head's levels given in parts (``tasks.outputs.
    level_groups``), as (name, shape without the batch) in the file's order: per level the
    box (``BOX_PART_CHANNELS``: distance distributions, YOLOv8's 64 or YOLOv6m's 68 values, or
    4 distances, YOLOv6n's), K class scores and optionally one more channel (Rockchip's score
    sum), carried. DaflError where the parts are not these or ``head`` names another layout."""
    names = ", ".join(name for name, _ in outputs)
    slices = level_slices([(1, *shape) for _, shape in outputs])
    parts = tuple(shape[0] for _, shape in outputs[slices[0]])
    box = parts[0] in BOX_PART_CHANNELS and (parts[0] > 4 or parts[1] > 1)
    if not (box and (len(parts) == 2 or len(parts) == 3 and parts[2] == 1)):
        raise DaflError(f"the outputs {names} are a head's levels in parts of "
                        f"{', '.join(map(str, parts))} channels; read are YOLOv8's and YOLOv6's: "
                        "the box (64 or 68 distance-distribution values, or 4 distances beside "
                        "two or more classes), the class scores and optionally a score sum of "
                        "one channel, per level")  # fmt: skip
    if head not in (None, "yolov8"):
        raise DaflError(f"--head {head}: the outputs {names} are a YOLOv8 head's levels in "
                        "parts, read as yolov8")  # fmt: skip
    levels = tuple((sum(parts), *outputs[level.start][1][1:]) for level in slices)
    return HeadLayout("yolov8", parts[1], parts[0], levels=levels, level_parts=parts,
                      outputs=tuple(name for name, _ in outputs))  # fmt: skip


def decoded_and_levels(outputs: list[tuple[str, tuple[int, ...]]],
                       head: str | None = None) -> HeadLayout:  # fmt: skip
    """The layout of a decoded YOLOv5 output followed by its levels (``tasks.outputs.
    beside_levels``), given as (name, shape without the batch) in the file's order; DaflError
    where ``head`` names another layout."""
    (name, shape), levels = outputs[0], outputs[1:]
    if head not in (None, "yolov5"):
        raise DaflError(f"--head {head}: the outputs {', '.join(n for n, _ in outputs)} are a "
                        f"decoded YOLOv5 output ({name}) and its levels, read as "
                        "yolov5")  # fmt: skip
    return HeadLayout("yolov5", shape[-1] - YOLOV5_BOX_CHANNELS,
                      outputs=tuple(n for n, _ in outputs),
                      beside=tuple(tuple(s) for _, s in levels))  # fmt: skip


def in_rows(outputs: list[tuple[str, tuple[int, ...]]], head: str | None = None) -> HeadLayout:
    """The boxes+scores layout of a head given per level as rows (``tasks.outputs.
    row_level_groups``: PicoDet's scores (N, A_l, K) and box distributions (N, A_l, 32) per
    level), given as (name, (A_l, C)) in the file's order: each level's outputs read as
    ``joined`` reads two or three outputs (the first level's names and channels)."""
    names = ", ".join(name for name, _ in outputs)
    if head not in (None, "boxes+scores", "ssd"):
        raise DaflError(f"--head {head}: the outputs {names} are a head's boxes and scores per "
                        "level, read as boxes+scores (or ssd)")  # fmt: skip
    levels = row_level_groups([(1, *shape) for _, shape in outputs])
    try:
        first = joined([(outputs[i][0], outputs[i][1][-1]) for i in levels[0]], False, head,
                       distributions=True)  # fmt: skip
    except DaflError as error:
        raise DaflError(f"the outputs {names}, per level: {error}") from None
    return replace(first, outputs=tuple(name for name, _ in outputs),
                   row_shapes=tuple(tuple(shape) for _, shape in outputs))  # fmt: skip


def joined_layout(details: dict, head: str | None = None) -> HeadLayout | None:
    """The layout of a teacher's outputs as its import joined them (``details``, under a
    ``tasks.outputs.JOIN_KINDS`` key), scores not yet told logits or probabilities; None where
    they were not joined; DaflError where they are no head that is read."""
    def dims(key: str) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(shape)) for name, shape in details[key]]

    if details.get("joined_levels"):
        return per_level(dims("joined_levels"), head)
    if details.get("joined_levels_last"):
        levels = [(name, channels_first(shape)) for name, shape in dims("joined_levels_last")]
        return replace(per_level(levels, head), channels_last=True)
    if details.get("joined_level_parts"):
        return in_parts(dims("joined_level_parts"), head)
    if details.get("decoded_and_levels"):
        return decoded_and_levels(dims("decoded_and_levels"), head)
    if details.get("joined_level_rows"):
        return in_rows(dims("joined_level_rows"), head)
    if details.get("joined_outputs"):
        return joined([(name, int(c)) for name, c in details["joined_outputs"]], False, head)
    return None


def _level_outputs(rows: torch.Tensor, levels: tuple[tuple[int, ...], ...],
                   last: bool = False) -> tuple:  # fmt: skip
    """(N, A, C) rows split into each level's output as the file gives it (``levels``: their
    shapes, no batch, channels first; ``last``: the file gives (N, h, w, C))."""
    counts = [level_locations(shape) for shape in levels]
    parts = rows.split(counts, dim=1)
    if last:  # the rows are the cells' channels already
        return tuple(part.reshape(part.shape[0], *channels_last(shape))
                     for part, shape in zip(parts, levels))  # fmt: skip
    return tuple(level_output(part, shape) for part, shape in zip(parts, levels))


def _expected_distances(distributions: torch.Tensor) -> torch.Tensor:
    """(…, 4) the expected distance to each side (left, top, right, bottom), in strides, from
    (…, 4 B) logits of a distribution over B distances (0 .. B - 1) per side."""
    bins = distributions.unflatten(-1, (4, distributions.shape[-1] // 4)).softmax(dim=-1)
    return bins @ torch.arange(bins.shape[-1]).to(bins)


PYRAMID_FIRST_STRIDES = (8, 4, 16, 2, 32)  # a pyramid's finest stride, the usual first ...
PYRAMID_LEVELS = (3, 4, 5, 2)  # ... and its levels, each twice the stride of the one before
MAX_STRIDE_POWER = 8  # a level's stride: a power of two up to 256


def with_pyramid(layout: HeadLayout, image_size: tuple[int, int],
                 output_shape: tuple[int, ...]) -> HeadLayout:  # fmt: skip
    """``layout`` decoding its boxes to pixels where they are distances to the sides about
    cells that the input size (``image_size``, H and W) places: a YOLOv8/v6 head's levels
    whose grids tile the input, or box distributions beside scores (KerasCV's YOLOV8Detector:
    ``boxes`` (N, A, 64) beside ``classes`` (N, A, K); PicoDet's per level, (N, A_l, 32))
    whose A locations (``output_shape``, no batch) are exactly one pyramid of strides doubling
    level by level, its finest cells first; else ``layout`` as it is (encoded, compared
    location by location)."""
    height, width = image_size
    layout = replace(layout, pyramid=())
    if layout.name == "yolov8" and layout.levels and layout.anchors == 1:
        pyramid = tuple(_level_cells(shape, height, width) for shape in layout.levels)
        return layout if None in pyramid else replace(layout, pyramid=pyramid)
    distributions = layout.name == "boxes+scores" and layout.box_channels in DISTRIBUTION_CHANNELS
    if not distributions or set(layout.parts) != {BOXES, SCORES} or layout.background:
        return layout
    for first in PYRAMID_FIRST_STRIDES:
        for levels in PYRAMID_LEVELS:
            pyramid = tuple(_grid(height, width, first * 2**i) for i in range(levels))
            if _holds(pyramid, layout, output_shape[0]):
                return replace(layout, pyramid=pyramid)
    return layout


def _holds(pyramid: tuple[tuple[int, int, int], ...], layout: HeadLayout, locations: int) -> bool:
    """Whether ``pyramid``'s cells are the head's ``locations``: level by level where the file
    gives its levels as rows (``row_shapes``), else in all."""
    if not layout.row_shapes:
        return sum(h * w for h, w, _ in pyramid) == locations
    return [rows for rows, _ in layout.row_levels] == [h * w for h, w, _ in pyramid]


def _grid(height: int, width: int, stride: int) -> tuple[int, int, int]:
    """(h, w, stride): the cells of an input of ``height`` x ``width`` at ``stride``, the
    last ones overhanging it as padded convolutions leave them."""
    return math.ceil(height / stride), math.ceil(width / stride), stride


def _level_cells(shape: tuple[int, ...], height: int, width: int) -> tuple[int, int, int] | None:
    """(h, w, stride) of a level of ``shape`` (no batch, channels first) whose grid tiles an
    input of ``height`` x ``width`` at one power-of-two stride (the last cells may overhang, as
    padded convolutions leave them); None if not."""
    grids = (_grid(height, width, 2**power) for power in range(MAX_STRIDE_POWER + 1))
    return next((grid for grid in grids if grid[:2] == level_cells(shape)), None)


def _in_pixels(about_cell: torch.Tensor, pyramid: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """(N, A, 4) boxes about their cells (in strides, ``_box_about_cell``) in input pixels:
    the cells of ``pyramid`` level by level, row-major, each centred half a stride in."""
    centres = []
    for cells_high, cells_wide, stride in pyramid:
        y, x = torch.meshgrid(torch.arange(cells_high), torch.arange(cells_wide), indexing="ij")
        cell = torch.stack([x.flatten(), y.flatten()], dim=-1)
        centres.append(torch.cat([(cell + 0.5) * stride, torch.full_like(cell[:, :1], stride)], -1))
    centre_x, centre_y, stride = torch.cat(centres).to(about_cell).unbind(-1)
    zeros = torch.zeros_like(stride)
    offset = torch.stack([centre_x, centre_y, zeros, zeros], dim=-1)
    return about_cell * stride[:, None] + offset


def _box_about_cell(distances: torch.Tensor) -> torch.Tensor:
    """(…, 4) a box (cx, cy, w, h) about its cell's centre from (…, 4) distances to its left,
    top, right and bottom sides."""
    left, top, right, bottom = distances.unbind(-1)
    return torch.stack([(right - left) / 2, (bottom - top) / 2, left + right, top + bottom], -1)


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


def joined(outputs: list[tuple[str, int]], logits: bool, head: str | None = None,
           distributions: bool = False) -> HeadLayout:  # fmt: skip
    """The boxes+scores layout of two or three outputs joined along their last axis, given as
    (name, channels) in the file's order (``distributions``: two outputs per level of a head
    given as rows, its box output told by its distribution channels where nothing else tells);
    DaflError when which is which cannot be told."""
    names = ", ".join(name for name, _ in outputs)
    if head not in (None, "boxes+scores", "ssd"):
        raise DaflError(f"--head {head} reads one output; the file has {len(outputs)} "
                        f"({names}): use --head boxes+scores or ssd")  # fmt: skip
    if len(outputs) not in (2, 3):
        raise DaflError(f"{len(outputs)} outputs ({names}); {describe_layouts()}")
    parts = _parts(outputs, distributions and head is None)
    if parts is None and head is not None:  # --head boxes+scores or ssd: the file's order
        third = (QUALITY if outputs[-1][1] == 1 else KEYPOINTS,) if len(outputs) == 3 else ()
        parts = (BOXES, SCORES, *third)
    if parts is None:
        seen = " and ".join(f"{name} (.., {c})" for name, c in outputs)
        raise DaflError(f"cannot tell the boxes from the scores among outputs {seen}; with "
                        "--head boxes+scores (or ssd) they are read in the file's order: "
                        "boxes, scores, then a centre-ness (one value) or keypoints")  # fmt: skip
    channels = dict(zip(parts, (c for _, c in outputs)))
    if channels[BOXES] < 4:
        raise DaflError(f"the box output has {channels[BOXES]} values per location; at least 4 "
                        "(cx, cy, w, h) are needed")  # fmt: skip
    if channels.get(QUALITY, 1) != 1:
        raise DaflError(f"the centre-ness output has {channels[QUALITY]} values per location; "
                        "one is read")  # fmt: skip
    layout = HeadLayout("boxes+scores", channels[SCORES], channels[BOXES], parts, logits,
                        tuple(name for name, _ in outputs), channels.get(KEYPOINTS, 0))
    return layout.with_background() if head == "ssd" else layout


def _parts(outputs: list[tuple[str, int]], distributions: bool = False) -> tuple[str, ...] | None:
    """Each output's part (boxes, scores, and a third output's centre-ness or keypoints), by
    name, else by channels (four for the boxes, one for a centre-ness; keypoints are told by
    name only; with ``distributions``, of two outputs the one of ``DISTRIBUTION_CHANNELS`` for
    the boxes: PicoDet's 32 beside its scores); None when neither tells."""
    base, three = {BOXES, SCORES}, len(outputs) == 3
    by_name = tuple(_part_named(name) for name, _ in outputs)
    named_sets = [base | {QUALITY}, base | {KEYPOINTS}] if three else [base]
    if set(by_name) in named_sets and len(set(by_name)) == len(by_name):
        return by_name
    by_channels = {4: BOXES, 1: QUALITY} if three else {4: BOXES}
    guess = tuple(by_channels.get(c, SCORES) for _, c in outputs)
    wanted = base | {QUALITY} if three else base
    if set(guess) == wanted and len(set(guess)) == len(guess):
        return guess
    boxes = [c in DISTRIBUTION_CHANNELS for _, c in outputs]
    if distributions and not three and sum(boxes) == 1:
        return tuple(BOXES if box else SCORES for box in boxes)
    return None


def _part_named(name: str) -> str | None:
    """The part an output's name says it is: centre-ness, keypoints, scores or boxes, in that
    order (FCOS's ``bbox_ctrness`` is a centre-ness, not boxes)."""
    for part, pattern in ((QUALITY, _QUALITY_NAME), (KEYPOINTS, _KEYPOINT_NAME),
                          (SCORES, _SCORE_NAME), (BOXES, _BOX_NAME)):  # fmt: skip
        if pattern.search(name):
            return part
    return None


LAYOUTS_TEXT = ("one output (N, 4 + K, A) (YOLOv8/v11) or (N, A, 5 + K) (YOLOv5), or a "
                "YOLO head's levels, (N, anchors, h, w, 5 + K), (N, anchors * (5 + K), h, w) "
                "or (N, h, w, anchors * (5 + K)) each (YOLOv8's (N, 64 + K, h, w) with --head "
                "yolov8, or in parts: (N, 64, h, w), (N, K, h, w) and a score sum (N, 1, h, w) "
                "per level), or two, boxes (N, A, 4+) and scores (N, A, K) (SSD-style), with a "
                "centre-ness (N, A, 1) (FCOS) or keypoints (N, A, P) (RetinaFace) as a "
                "third, or those per level as rows, (N, A_l, C) each (PicoDet)")  # fmt: skip


def describe_layouts() -> str:
    """What --task detection reads, for messages."""
    return f"--task detection reads {LAYOUTS_TEXT}"


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(…, 4) centre/size boxes as corners, widths and heights clamped at 0."""
    centre, size = boxes[..., :2], boxes[..., 2:].clamp_min(0)
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)
