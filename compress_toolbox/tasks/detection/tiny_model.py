"""A tiny YOLOv8-style anchor-free detector (the benchmark's and the tests' teacher): a strided
conv backbone, a top-down neck (upsample + concatenation) and a decoupled head at strides 8 and
16, whose output is already decoded as ultralytics exports it: (N, 4 + K, A) with boxes
(cx, cy, w, h) in input pixels and sigmoid class scores; and its kin for the other raw heads
(``TinyBoxesScores``: SSD/FCOS/BlazeFace-style outputs; ``TinyYoloLevels``: a YOLOv5/v7 head's
levels before decoding; ``TinyYoloParts``: a YOLOv8 head's levels in parts)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STRIDES = (8, 16)


def cell_centres(input_size: tuple[int, int], stride: int) -> torch.Tensor:
    """(1, 2, cells) the centre (x, y) in pixels of each cell at ``stride``, row-major: the
    ceil(H / s) x ceil(W / s) cells that stride-2 convs with padding 1 leave."""
    rows, cols = (math.ceil(n / stride) for n in input_size)
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return (torch.stack([xs, ys]).reshape(1, 2, -1).float() + 0.5) * stride


def decode_level(box: torch.Tensor, cls: torch.Tensor, centres: torch.Tensor, stride: int,
                 objectness: bool) -> torch.Tensor:  # fmt: skip
    """One level's (N, box + K, cells) raw output as ultralytics exports it, from its box
    values (N, 4, cells; a fifth, objectness, with ``objectness``) and class logits (N, K,
    cells): the distances from each cell's centre to the box's sides (softplus, so positive;
    times twice the stride, so that a raw 0 is a box about a cell wide) as centre and size in
    pixels, then the scores through a sigmoid (objectness first)."""
    scores = [torch.sigmoid(cls)]
    if objectness:
        box, scores = box[:, :4], [torch.sigmoid(box[:, 4:]), *scores]
    ltrb = F.softplus(box) * (2 * stride)
    centre = centres + (ltrb[:, 2:] - ltrb[:, :2]) / 2
    return torch.cat([centre, ltrb[:, :2] + ltrb[:, 2:], *scores], dim=1)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))  # fmt: skip


class _Head(nn.Module):
    """One level's decoupled head: a box branch (4 distances, and an objectness logit for the
    YOLOv5 layout) and a class branch (K logits)."""

    def __init__(self, channels: int, num_classes: int, objectness: bool = False) -> None:
        super().__init__()
        box = 5 if objectness else 4
        self.box = nn.Sequential(_conv(channels, channels), nn.Conv2d(channels, box, 1))
        self.cls = nn.Sequential(_conv(channels, channels), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.box(x), self.cls(x)


class _Features(nn.Module):
    """The tiny detectors' strided conv backbone and top-down neck: (4c, S/8, S/8) and
    (8c, S/16, S/16) feature maps for c = ``width``."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        c = width
        self.stem = nn.Sequential(_conv(in_channels, c, 2), _conv(c, 2 * c, 2))
        self.p3 = _conv(2 * c, 4 * c, 2)
        self.p4 = _conv(4 * c, 8 * c, 2)
        self.fuse = _conv(12 * c, 4 * c)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p3 = self.fuse(torch.cat([p3, F.interpolate(p4, scale_factor=2.0, mode="nearest")], 1))
        return p3, p4


class TinyYolo(_Features):
    """(N, C, S, S) images -> (N, 4 + K, A) with A = (S/8)^2 + (S/16)^2 locations; with
    ``yolov5=True`` the YOLOv5 layout instead, (N, A, 5 + K) with an objectness score."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16,
                 image_size: int = 64, yolov5: bool = False) -> None:  # fmt: skip
        super().__init__(in_channels, width)
        c, self.yolov5 = width, yolov5
        self.heads = nn.ModuleList([_Head(4 * c, num_classes, yolov5),
                                    _Head(8 * c, num_classes, yolov5)])  # fmt: skip
        for stride in STRIDES:
            self.register_buffer(f"grid{stride}", cell_centres((image_size, image_size), stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = [self._decode(*head(p), stride)
                  for head, p, stride in zip(self.heads, self.features(x), STRIDES)]  # fmt: skip
        out = torch.cat(levels, dim=2)
        return out.transpose(1, 2) if self.yolov5 else out

    def _decode(self, box: torch.Tensor, cls: torch.Tensor, stride: int) -> torch.Tensor:
        return decode_level(box.flatten(2), cls.flatten(2), getattr(self, f"grid{stride}"),
                            stride, self.yolov5)  # fmt: skip


class TinyBoxesScores(_Features):
    """A BlazeFace/SSD-style detector with two outputs, as TFLite face detectors give them:
    box values (N, A, 4 + 2 * keypoints) left encoded per location (the anchors are the
    user's) and class logits (N, A, K), at strides 8 and 16 on the same backbone and neck as
    ``TinyYolo``; with ``centreness=True`` an FCOS-style third output, a centre-ness logit
    (N, A, 1)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16,
                 keypoints: int = 2, centreness: bool = False) -> None:  # fmt: skip
        super().__init__(in_channels, width)
        branch = lambda channels: nn.ModuleList([nn.Conv2d(4 * width, channels, 1),  # noqa: E731
                                                 nn.Conv2d(8 * width, channels, 1)])  # fmt: skip
        self.boxes, self.scores = branch(4 + 2 * keypoints), branch(num_classes)
        self.centreness = branch(1) if centreness else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels = self.features(x)
        rows = lambda convs: torch.cat([conv(p).flatten(2).transpose(1, 2)  # noqa: E731
                                        for conv, p in zip(convs, levels)], dim=1)  # fmt: skip
        if self.centreness is None:
            return rows(self.boxes), rows(self.scores)
        return rows(self.boxes), rows(self.scores), rows(self.centreness)


class TinyYoloLevels(_Features):
    """A YOLOv5/v7-style head's levels before decoding, one output per stride (8 and 16), as
    YOLOv7's export gives them without ``--grid``: (N, anchors, h, w, 5 + K) raw logits (box
    offsets, objectness, class logits per anchor and cell); with ``rank=4`` the convolutions'
    own (N, anchors * (5 + K), h, w)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16,
                 anchors: int = 3, rank: int = 5) -> None:  # fmt: skip
        super().__init__(in_channels, width)
        self.anchors, self.rank, self.row = anchors, rank, 5 + num_classes
        self.convs = nn.ModuleList([nn.Conv2d(4 * width, anchors * self.row, 1),
                                    nn.Conv2d(8 * width, anchors * self.row, 1)])  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels = [conv(p) for conv, p in zip(self.convs, self.features(x))]
        if self.rank == 4:
            return tuple(levels)
        return tuple(level.reshape(level.shape[0], self.anchors, self.row, *level.shape[2:])
                     .permute(0, 1, 3, 4, 2) for level in levels)  # fmt: skip


class TinyYoloParts(_Features):
    """A YOLOv8-style head's levels given in parts, as Rockchip's exports for its NPUs give
    them: per stride (8, 16) the box distributions (N, 64, h, w) (``box_channels`` 4: the
    distances to the sides, as YOLOv6n's), the class scores through a sigmoid (N, K, h, w)
    and, with ``score_sum``, their sum clipped to [0, 1] (N, 1, h, w)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16,
                 score_sum: bool = True, box_channels: int = 64) -> None:  # fmt: skip
        super().__init__(in_channels, width)
        self.score_sum = score_sum
        self.boxes = nn.ModuleList([nn.Conv2d(4 * width, box_channels, 1),
                                    nn.Conv2d(8 * width, box_channels, 1)])  # fmt: skip
        self.scores = nn.ModuleList([nn.Conv2d(4 * width, num_classes, 1),
                                     nn.Conv2d(8 * width, num_classes, 1)])  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = []
        for box, score, p in zip(self.boxes, self.scores, self.features(x)):
            scores = torch.sigmoid(score(p))
            parts += [box(p), scores]
            if self.score_sum:
                parts.append(scores.sum(1, keepdim=True).clamp(0, 1))
        return tuple(parts)


class TinyRowLevels(_Features):
    """A PicoDet-style head given per level as rows, as PaddleDetection exports it: the class
    scores through a sigmoid (N, h * w, K) of every level (strides 8 and 16), then the box
    distributions over ``bins`` distances per side (N, h * w, 4 * bins) of every level."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16,
                 bins: int = 8) -> None:  # fmt: skip
        super().__init__(in_channels, width)
        branch = lambda channels: nn.ModuleList([nn.Conv2d(4 * width, channels, 1),  # noqa: E731
                                                 nn.Conv2d(8 * width, channels, 1)])  # fmt: skip
        self.scores, self.boxes = branch(num_classes), branch(4 * bins)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels = self.features(x)
        rows = lambda conv, p: conv(p).flatten(2).transpose(1, 2)  # noqa: E731
        scores = [torch.sigmoid(rows(conv, p)) for conv, p in zip(self.scores, levels)]
        return (*scores, *[rows(conv, p) for conv, p in zip(self.boxes, levels)])


class RawLevels(nn.Module):
    """A YOLOv5-layout ``TinyYolo`` handed over as a YOLOv5/v7 export without its grid gives
    it: each level's raw head output before decoding, (N, 1, h, w, 5 + K) (one anchor per
    cell: four box logits, objectness and class logits). ``rows_of_levels`` decodes them."""

    def __init__(self, model: TinyYolo) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels = []
        for head, p in zip(self.model.heads, self.model.features(x)):
            raw = torch.cat(head(p), dim=1)  # (N, 5 + K, h, w)
            levels.append(raw.permute(0, 2, 3, 1).unsqueeze(1))
        return tuple(levels)


def rows_of_levels(levels: tuple[torch.Tensor, ...],
                   image_size: tuple[int, int]) -> torch.Tensor:  # fmt: skip
    """``RawLevels``' outputs decoded as the model's own YOLOv5 output: (N, A, 5 + K) rows,
    boxes in pixels, scores through a sigmoid."""
    decoded = []
    for level, stride in zip(levels, STRIDES):
        values = level.flatten(1, 3).transpose(1, 2)  # (N, 5 + K, cells)
        centres = cell_centres(image_size, stride).to(values)
        decoded.append(decode_level(values[:, :5], values[:, 5:], centres, stride, True))
    return torch.cat(decoded, dim=2).transpose(1, 2)
