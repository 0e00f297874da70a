"""Small YOLO-style detectors whose raw output is laid out as an ultralytics export is
(``compress_toolbox.tasks.detection.heads``): ``yolov8`` (N, 4 + K, A) or ``yolov5``
(N, A, 5 + K), boxes (cx, cy, w, h) in input pixels and scores through a sigmoid. Locations come
level after level, finest first; within a level anchor slot after anchor slot (YOLOv5's three
anchors per cell; YOLOv8 has one), then row-major. Built for a teacher of such a head, a model
here has exactly its output: ``grids_for`` finds the run of strides and the anchors per cell
whose grids hold the teacher's A locations ((8, 16, 32) at 320 x 320: 1600 + 400 + 100 for
YOLOv8, three times that for YOLOv5).

A strided conv backbone, a top-down neck (upsampling and concatenation, as YOLO's FPN) and a
decoupled head per level (box and class branches); ``width`` is the first conv's channels. Each
location predicts the distances from its centre to its box's sides, so no anchor sizes are
needed: the student learns the teacher's boxes whatever anchors produced them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compress_toolbox.tasks.detection.tiny_model import cell_centres, decode_level

from .registry import ZooCost, register_model

LEVEL_STRIDES = (8, 16, 32, 64)  # the strides a head may read from, finest first
HEADS = {"yolov8": 4, "yolov5": 5}  # box channels before the class scores (yolov5: objectness)
# anchors per cell, tried in order: YOLOv8 is anchor-free; YOLOv5 has three (variants one)
ANCHORS_PER_CELL = {"yolov8": (1,), "yolov5": (3, 1)}
_DEFAULT_INPUT = (3, 320, 320)
_DEFAULT_CLASSES = 80  # COCO as ultralytics numbers it


def grids_for(locations: int, input_size: tuple[int, int],
              head: str = "yolov8") -> tuple[tuple[int, ...], int]:  # fmt: skip
    """(strides, anchors per cell): the run of consecutive ``LEVEL_STRIDES`` whose grids
    (ceil(H / s) x ceil(W / s) cells each), times the anchors per cell the ``head`` may have,
    hold ``locations``; ValueError when none does."""
    height, width = input_size
    cells = [math.ceil(height / s) * math.ceil(width / s) for s in LEVEL_STRIDES]
    for anchors in ANCHORS_PER_CELL.get(head, (1,)):
        for first in range(len(cells)):
            for last in range(first, len(cells)):
                if anchors * sum(cells[first : last + 1]) == locations:
                    return LEVEL_STRIDES[first : last + 1], anchors
    raise ValueError(f"{locations} locations are no run of grids at strides "
                     f"{LEVEL_STRIDES} of a {height}x{width} input")  # fmt: skip


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.SiLU(inplace=True))  # fmt: skip


def _channels(width: int, stride: int) -> int:
    """Channels of the feature map at ``stride``: doubling with each halving, capped at 16x."""
    return width * min(stride // 2, 16)


class YoloStudent(nn.Module):
    """(N, C, H, W) images -> the ``head`` layout's raw output at ``strides``, with
    ``anchors`` locations per cell."""

    def __init__(self, num_classes: int, in_channels: int, input_size: tuple[int, int],
                 strides: tuple[int, ...], head: str = "yolov8", width: int = 8,
                 anchors: int = 1) -> None:  # fmt: skip
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"gives a {' or '.join(HEADS)} head, not {head}")
        self.head, self.strides, self.anchors = head, tuple(strides), anchors
        steps = int(math.log2(max(strides)))  # stride-2 convs from the input to the coarsest
        chans = [in_channels] + [_channels(width, 2**i) for i in range(1, steps + 1)]
        self.down = nn.ModuleList(_conv(chans[i], chans[i + 1], 2) for i in range(steps))
        self.stage_of_level = [int(math.log2(s)) for s in strides]  # into the down outputs
        level_chans = [chans[i] for i in self.stage_of_level]
        pairs = zip(level_chans[:-1], level_chans[1:])  # each level and the one above it
        self.fuse = nn.ModuleList(_conv(c + c_up, c) for c, c_up in pairs)
        box = HEADS[head] * anchors
        self.box = nn.ModuleList(nn.Sequential(_conv(c, c), nn.Conv2d(c, box, 1))
                                 for c in level_chans)  # fmt: skip
        self.cls = nn.ModuleList(nn.Sequential(_conv(c, c), nn.Conv2d(c, num_classes * anchors, 1))
                                 for c in level_chans)  # fmt: skip
        for stride in strides:
            self.register_buffer(f"grid{stride}", cell_centres(input_size, stride),
                                 persistent=False)  # fmt: skip

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The neck's map at each stride, finest first (top-down: coarse context fused in)."""
        stages = [x]
        for conv in self.down:
            stages.append(conv(stages[-1]))
        maps = [stages[i] for i in self.stage_of_level]
        for i in range(len(maps) - 2, -1, -1):
            upsampled = F.interpolate(maps[i + 1], size=maps[i].shape[-2:], mode="nearest")
            maps[i] = self.fuse[i](torch.cat([maps[i], upsampled], 1))
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self._level(box(p), cls(p), stride) for box, cls, p, stride
                in zip(self.box, self.cls, self._features(x), self.strides)]  # fmt: skip
        out = torch.cat(rows, dim=2)
        return out.transpose(1, 2) if self.head == "yolov5" else out

    def _level(self, box: torch.Tensor, cls: torch.Tensor, stride: int) -> torch.Tensor:
        """(N, box + K, anchors x cells): one level's locations, anchor slot after slot."""
        boxes, scores = box.flatten(2).chunk(self.anchors, 1), cls.flatten(2).chunk(self.anchors, 1)
        centres, yolov5 = getattr(self, f"grid{stride}"), self.head == "yolov5"
        return torch.cat([decode_level(b, s, centres, stride, yolov5)
                          for b, s in zip(boxes, scores)], dim=2)  # fmt: skip


def _builder(width: int):
    def build(*, num_classes: int, in_channels: int = 3,
              input_size: tuple[int, int] | None = None, head: str | None = "yolov8",
              locations: int | None = None) -> nn.Module:  # fmt: skip
        if head is None:  # a teacher whose head layout is unknown: no raw output to match
            raise ValueError("needs the teacher's head layout (yolov8 or yolov5)")
        size = tuple(input_size or _DEFAULT_INPUT[1:])
        strides, anchors = grids_for(locations, size, head) if locations else ((8, 16, 32), 1)
        return YoloStudent(num_classes, in_channels, size, strides, head, width, anchors)

    return build


def _register(name: str, width: int, params: int, macs: int) -> None:
    """Register the YOLO-style detector of ``width`` with its cost at the default input
    (yolov8 head, 80 classes, strides 8, 16, 32)."""
    build = _builder(width)
    build.__doc__ = f"YOLO-style detector, {width} channels at stride 2 (see the module)."
    register_model(task="detection", family="yolo", default_input=_DEFAULT_INPUT,
                   default_num_classes=_DEFAULT_CLASSES, meta=ZooCost(params, macs),
                   name=name)(build)  # fmt: skip


_register("yolo_pico", 4, params=166_368, macs=58_137_600)
_register("yolo_nano", 8, params=644_100, macs=219_494_400)
_register("yolo_small", 16, params=2_534_412, macs=851_865_600)
