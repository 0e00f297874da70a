"""How a model's output is seen by every task: per-sample logits (``as_samples``), the main
tensor of a dict or tuple output (``MainOutput``), or all of them joined (``JoinedOutputs``:
a detection head's boxes and scores along the channels, a YOLO head's levels along the
locations), and the activations a teacher's file ends in, taken off for distillation and
given back to the shipped student (``FILE_OUTPUTS``)."""

from __future__ import annotations

import torch
from torch import nn


def as_samples(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) logits as they are; (N, K, *spatial) logits as (N * prod(spatial), K): one
    sample per pixel."""
    if logits.dim() <= 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def labels_as_samples(labels: torch.Tensor) -> torch.Tensor:
    """Class indices matching ``as_samples``: (N,) as they are, (N, *spatial) flattened."""
    return labels.reshape(-1)


class MainOutput(nn.Module):
    """A model whose output is a dict (torchvision's segmentation models: ``{"out": ...,
    "aux": ...}``), list or tuple, made to return its main tensor (``out``, else the first)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, dict):
            out = out["out"] if "out" in out else next(iter(out.values()))
        while isinstance(out, (list, tuple)):
            out = out[0]
        return out


class JoinedOutputs(nn.Module):
    """A model returning several tensors (a tuple, list or dict) made to return them as one:
    (N, A, C_i) joined along the last axis, (N, A, sum C_i) (a detection head's boxes and
    scores); with ``levels``, per-level YOLO outputs as rows (``level_rows``) joined along the
    locations."""

    def __init__(self, model: nn.Module, levels: bool = False) -> None:
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return join_tensors(list(tensors_of(self.model(x)).values()), self.levels)


def tensors_of(out) -> dict[str, torch.Tensor]:
    """A model's tensors by name: a dict's keys, ``output0``, ``output1``, ... for a tuple or
    list, ``output0`` for a lone tensor."""
    if isinstance(out, dict):
        return dict(out)
    if isinstance(out, (list, tuple)):
        return {f"output{i}": value for i, value in enumerate(out)}
    return {"output0": out}


def joinable(shapes: list[tuple[int, ...]]) -> bool:
    """Whether outputs of these shapes (batch first) can be joined along their last axis:
    two or more, each (N, A, C) with the same N and A."""
    return len(shapes) > 1 and all(len(s) == 3 and s[:2] == shapes[0][:2] for s in shapes)


YOLO_ANCHORS = 3  # YOLOv5/v7 heads: three anchor boxes per cell and level
MIN_ROW = 6  # a YOLO row: cx, cy, w, h, objectness and one class at least


def anchors_per_cell(shape: tuple[int, ...]) -> int:
    """The anchors per cell of one per-level YOLO output of ``shape`` (no batch): (na, h, w,
    C) says it; (na * C, h, w) is read as YOLOv5/v7's three anchors where its channels divide
    into three rows of six or more values, else as one (anchor-free, YOLOX)."""
    if len(shape) == 4:
        return shape[0]
    three = shape[0] % YOLO_ANCHORS == 0 and shape[0] // YOLO_ANCHORS >= MIN_ROW
    return YOLO_ANCHORS if three else 1


def row_channels(shape: tuple[int, ...]) -> int:
    """The values per location (anchor slot and cell) of a per-level output of ``shape``."""
    return shape[-1] if len(shape) == 4 else shape[0] // anchors_per_cell(shape)


def levels_joinable(shapes: list[tuple[int, ...]]) -> bool:
    """Whether outputs of these shapes (batch first) are one YOLO head's levels, joinable
    along their locations: two or more of one rank, either (N, na, h, w, C) (YOLOv5/v7 raw
    exports) or (N, na * C, h, w) (the convolutions' own output), with the same N, anchors
    and C >= 6 values per location, and grids of different sizes."""
    if len(shapes) < 2 or len({len(s) for s in shapes}) != 1 or len(shapes[0]) not in (4, 5):
        return False
    cells = {level_cells(s[1:]) for s in shapes}
    same = {(s[0], s[1], s[-1] if len(s) == 5 else 0) for s in shapes}  # batch, channels
    return len(same) == 1 and len(cells) == len(shapes) and row_channels(shapes[0][1:]) >= MIN_ROW


def join_tensors(tensors: list[torch.Tensor], levels: bool | None = None) -> torch.Tensor:
    """A model's several outputs as one, as the import joins them: a YOLO head's levels as
    rows along the locations (``levels``; None: where their shapes are levels'), else along
    the last axis (one output as it is)."""
    if levels is None:
        levels = levels_joinable([tuple(t.shape) for t in tensors])
    if not levels:
        return torch.cat(tensors, dim=-1)
    return torch.cat([level_rows(t) for t in tensors], dim=1)


def joined_details(names: list[str], shapes: list[tuple[int, ...]]) -> dict | None:
    """How a file's outputs of these names and shapes (batch first) are joined, for the
    teacher's details: ``joined_outputs`` (each output's [name, channels]: along the last
    axis) or ``joined_levels`` (each output's [name, shape without the batch]: a YOLO head's
    levels, along the locations), with the ``distilled_output`` it makes; None when they are
    neither."""
    if joinable(shapes):
        return {"joined_outputs": [[n, int(s[-1])] for n, s in zip(names, shapes)],
                "distilled_output": "every output, joined along the last axis"}  # fmt: skip
    if levels_joinable(shapes):
        return {"joined_levels": [[n, [int(d) for d in s[1:]]] for n, s in zip(names, shapes)],
                "distilled_output": "every level's output, joined along the locations"}
    return None


def level_cells(shape: tuple[int, ...]) -> tuple[int, int]:
    """The grid (h, w) of a per-level output of ``shape`` (no batch)."""
    return tuple(shape[1:3]) if len(shape) == 4 else tuple(shape[1:])


def level_locations(shape: tuple[int, ...]) -> int:
    """The rows ``level_rows`` makes of a per-level output of ``shape`` (no batch): one per
    anchor slot and cell of (na, h, w, C), one per cell of (na * C, h, w)."""
    height, width = level_cells(shape)
    return (shape[0] if len(shape) == 4 else 1) * height * width


def level_output(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """One level's rows as the file gives the level, ``shape`` (no batch): the inverse of
    ``level_rows``."""
    if len(shape) == 4:
        return rows.reshape(rows.shape[0], *shape)
    return rows.transpose(1, 2).reshape(rows.shape[0], *shape)


def level_rows(out: torch.Tensor) -> torch.Tensor:
    """One per-level output as rows, row-major over its grid: (N, na, h, w, C) as (N, na * h
    * w, C), anchor by anchor as YOLOv5 lays its joined output out; (N, channels, h, w) as
    (N, h * w, channels), one row per cell, which the head's layout reads as its anchors'
    rows (``HeadLayout.locations_last``): how many anchors its channels hold is the layout's
    reading, not the join's."""
    if out.dim() == 5:
        return out.reshape(out.shape[0], -1, out.shape[-1])
    return out.flatten(2).transpose(1, 2)


class Softmaxed(nn.Module):
    """A logits model given back the Softmax its file ended in (over ``dim``): what the
    student is exported as when the teacher's file outputs probabilities, so that
    ``student.onnx`` answers like the teacher's file."""

    def __init__(self, model: nn.Module, dim: int = 1) -> None:
        super().__init__()
        self.model, self.dim = model, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=self.dim)


class SigmoidAsTwoClasses(nn.Module):
    """A model whose file ends in a one-channel Sigmoid (a binary map or classifier), cut
    before it, seen as two classes: logits (-z/2, z/2), whose softmax is (1 - p, p) with
    p = sigmoid(z), so the teacher is distilled and scored as a 2-class one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.model(x) / 2
        return torch.cat([-half, half], dim=1)


class SigmoidMap(nn.Module):
    """A 2-class logits model answering as a one-channel Sigmoid file does: p(class 1)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)[:, 1:2]


# how the teacher's file answers -> the student as it is shipped (``distilled_output`` values)
FILE_OUTPUTS = {
    "logits before its Softmax": Softmaxed,
    "the logit before its Sigmoid, as two classes": SigmoidMap,
}
