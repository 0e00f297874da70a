"""How a model's output is seen by every task: per-sample logits (``as_samples``), the main
tensor of a dict or tuple output (``MainOutput``), or all of them joined (``JoinedOutputs``:
a detection head's boxes and scores along the channels, a YOLO head's levels (channels first
or last) along the locations, a decoded YOLO output with its levels' rows beside it, a head's
levels given in parts or as rows: ``JOIN_KINDS``), and the activations a teacher's file ends
in, taken off for distillation and given back to the shipped student (``FILE_OUTPUTS``)."""

from __future__ import annotations

import itertools

import torch
from torch import fx, nn


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
    """A model returning several tensors (a tuple, list or dict) made to return them as one,
    as ``join_tensors`` joins them the ``kind`` way (``JOIN_KINDS``)."""

    def __init__(self, model: nn.Module, kind: str = "channels") -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return join_tensors(list(tensors_of(self.model(x)).values()), self.kind)

    def as_graph(self) -> fx.GraphModule | None:
        """The same computation as one fx graph sharing the model's layers (the model's graph
        with the join appended), where the model is an fx graph; else None. Graph passes
        (torch-pruning's, the derived student's trunk) then see the join as one more node."""
        if not isinstance(self.model, fx.GraphModule):
            return None
        graph = fx.Graph()
        outputs = graph.graph_copy(self.model.graph, {})
        tensors = list(tensors_of(outputs).values())
        graph.output(graph.call_function(join_tensors, (tensors, self.kind)))
        return fx.GraphModule(self.model, graph)


def tensors_of(out) -> dict[str, torch.Tensor]:
    """A model's tensors by name: a dict's keys, ``output0``, ``output1``, ... for a tuple or
    list (nested ones flattened in order, as ``torch.onnx.export`` flattens YOLOv5's
    ``(decoded, [levels])``), ``output0`` for a lone tensor."""
    if isinstance(out, dict):
        return dict(out)
    if isinstance(out, (list, tuple)):
        return {f"output{i}": value for i, value in enumerate(_flattened(out))}
    return {"output0": out}


def _flattened(values: list | tuple) -> list:
    """Nested lists and tuples as one list, in order."""
    flat = []
    for value in values:
        flat.extend(_flattened(value) if isinstance(value, (list, tuple)) else [value])
    return flat


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
    and C >= 6 values per location, on grids of one image at different strides
    (``grid_pyramid``)."""
    if len(shapes) < 2 or len({len(s) for s in shapes}) != 1 or len(shapes[0]) not in (4, 5):
        return False
    same = {(s[0], s[1], s[-1] if len(s) == 5 else 0) for s in shapes}  # batch, channels
    return (len(same) == 1 and grid_pyramid([level_cells(s[1:]) for s in shapes])
            and row_channels(shapes[0][1:]) >= MIN_ROW)  # fmt: skip


def levels_last_joinable(shapes: list[tuple[int, ...]]) -> bool:
    """Whether outputs of these shapes (batch first) are one YOLO head's levels with their
    channels last, (N, h, w, na * C) each (Keras and TensorFlow models: keras-yolo3's
    (N, 13, 13, 255), ...): two or more, the same N and channels, grids of one image at
    different strides (``grid_pyramid``), C >= 6 values per location; never ones
    ``levels_joinable`` reads channels first."""
    if len(shapes) < 2 or any(len(s) != 4 for s in shapes) or levels_joinable(shapes):
        return False
    same = {(s[0], s[3]) for s in shapes}
    return (len(same) == 1 and grid_pyramid([tuple(s[1:3]) for s in shapes])
            and row_channels(channels_first(shapes[0][1:])) >= MIN_ROW)  # fmt: skip


def grid_pyramid(grids: list[tuple[int, ...]]) -> bool:
    """Whether grids (h, w) are one image's at different strides: every height differs, every
    width differs, and each grid is scaled alike along both axes (within a quarter: sizes
    that strides do not divide round). Maps of one size with other channel counts (OpenPose's
    heatmaps and fields, CenterNet's heads, a segmenter's extra head) are not."""
    heights, widths = {g[0] for g in grids}, {g[1] for g in grids}
    if len(heights) != len(grids) or len(widths) != len(grids):
        return False
    height, width = grids[0]
    return all(abs(h / height - w / width) <= 0.25 * max(h / height, w / width)
               for h, w in grids)  # fmt: skip


def channels_first(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A channels-last level's shape (h, w, C) (no batch) as the channels-first one (C, h, w)
    the head layouts read (its rows are the same: one per cell, the cell's channels)."""
    return (shape[-1], *shape[:-1])


def channels_last(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The inverse of ``channels_first``: (C, h, w) as (h, w, C)."""
    return (*shape[1:], shape[0])


MAX_ANCHORS = 9  # anchor slots per cell of a YOLO level given as (N, anchors, h, w, C)


def beside_levels(shapes: list[tuple[int, ...]]) -> bool:
    """Whether outputs of these shapes (batch first) are a decoded YOLO output (N, A, C)
    followed by the levels it was decoded from, (N, anchors, h, w, C) each with a few
    anchors, whose rows number A (YOLOv5/v7 in eval mode exported by a plain
    ``torch.onnx.export``)."""
    if len(shapes) < 2 or len(shapes[0]) != 3 or any(len(s) != 5 for s in shapes[1:]):
        return False
    if any(s[1] > MAX_ANCHORS for s in shapes[1:]):  # e.g. tokens (N, T, h, w, D), not anchors
        return False
    levels = shapes[1:]
    if len(levels) > 1 and not levels_joinable(levels):
        return False
    rows = sum(level_locations(s[1:]) for s in levels)
    same = all(s[0] == shapes[0][0] and s[-1] == shapes[0][-1] for s in levels)
    return same and rows == shapes[0][1] and shapes[0][-1] >= MIN_ROW


def level_groups(shapes: list[tuple[int, ...]]) -> list[int] | None:
    """How many consecutive outputs of these shapes (batch first) make each level, where they
    are a head's levels each given in parts along the channels (Rockchip's YOLOv8 and YOLOv6
    exports: the box (N, 64, h, w) (or YOLOv6's 68 or 4), class scores (N, K, h, w), a score
    sum (N, 1, h, w) per level): all (N, C_i, h, w), two or more levels of two or more parts
    on grids of different sizes, every level's parts of the same channels. None otherwise."""
    if len(shapes) < 4 or any(len(s) != 4 or s[0] != shapes[0][0] for s in shapes):
        return None
    grids: list[tuple[int, int]] = []
    parts: list[list[int]] = []
    for shape in shapes:
        if not grids or tuple(shape[2:]) != grids[-1]:
            grids.append(tuple(shape[2:]))
            parts.append([])
        parts[-1].append(shape[1])
    if len(set(grids)) != len(grids) or len(grids) < 2 or len(parts[0]) < 2:
        return None
    return [len(p) for p in parts] if all(p == parts[0] for p in parts) else None


MAX_LEVEL_RATIO = 6  # rows of a level as rows, at most this many times the next level's


def row_level_groups(shapes: list[tuple[int, ...]]) -> list[list[int]] | None:
    """Which outputs of these shapes (batch first) make each level, where they are a head's
    levels given as rows (PaddleDetection's PicoDet and GFL exports: class scores (N, A_l, K)
    of every level, then box distributions (N, A_l, 32) of every level): all (N, A, C), two or
    more levels of different A, each A under ``MAX_LEVEL_RATIO`` times the next (strides that
    double: about 4), every level the same channels in the same order, at least two outputs
    per level (one (N, A, C) per level is a sequence model's, not a head's). The outputs'
    indices per level, the most rows first; None otherwise."""
    if len(shapes) < 4 or any(len(s) != 3 or s[0] != shapes[0][0] for s in shapes):
        return None
    by_rows: dict[int, list[int]] = {}
    for index, shape in enumerate(shapes):
        by_rows.setdefault(shape[1], []).append(index)
    rows = sorted(by_rows, reverse=True)
    levels = [by_rows[count] for count in rows]
    channels = [[shapes[i][2] for i in level] for level in levels]
    pyramid = all(1 < big / small < MAX_LEVEL_RATIO for big, small in zip(rows, rows[1:]))
    if len(levels) < 2 or len(levels[0]) < 2 or not pyramid:
        return None
    return levels if all(c == channels[0] for c in channels) else None


# How several outputs join into one (``join_tensors``), each kind under its key in the
# teacher's details: a detection head's boxes and scores (N, A, C_i) along the last axis; a
# YOLO head's levels as rows (``level_rows``) along the locations (channels first, or last
# as Keras gives them: ``levels_last``); a decoded YOLO output with
# its levels' rows beside it, along the last axis, (N, A, 2 C); a head's levels given in
# parts, each level's parts along the channels, then as levels; a head's levels given as
# rows (``row_level_groups``), each level's outputs along the channels, then the levels along
# the locations.
JOIN_KINDS = {"channels": "joined_outputs", "levels": "joined_levels",
              "levels_last": "joined_levels_last", "beside": "decoded_and_levels",
              "parts": "joined_level_parts", "rows": "joined_level_rows"}  # fmt: skip


def join_kind(shapes: list[tuple[int, ...]]) -> str | None:
    """How outputs of these shapes (batch first) join (a ``JOIN_KINDS`` key); None: they do
    not."""
    if joinable(shapes):
        return "channels"
    if levels_joinable(shapes):
        return "levels"
    if levels_last_joinable(shapes):
        return "levels_last"
    if beside_levels(shapes):
        return "beside"
    if level_groups(shapes):
        return "parts"
    return "rows" if row_level_groups(shapes) else None


def join_kind_of(details: dict) -> str | None:
    """The join a teacher's details record (None: its outputs were not joined)."""
    return next((kind for kind, key in JOIN_KINDS.items() if details.get(key)), None)


def join_tensors(tensors: list[torch.Tensor], kind: str | None = None) -> torch.Tensor:
    """A model's several outputs as one, joined the ``kind`` way (None: the way their shapes
    join; one output as it is)."""
    if kind is None:
        kind = join_kind([tuple(t.shape) for t in tensors]) or "channels"
    if kind == "channels":
        return torch.cat(tensors, dim=-1)
    if kind == "levels":
        return torch.cat([level_rows(t) for t in tensors], dim=1)
    if kind == "levels_last":
        return torch.cat([level_rows(t, channels_last=True) for t in tensors], dim=1)
    if kind == "parts":
        return join_tensors(parts_joined(tensors), "levels")
    if kind == "rows":
        levels = row_level_groups([tuple(t.shape) for t in tensors])
        if levels is None:
            raise ValueError("outputs are not a head's levels given as rows")
        return torch.cat([torch.cat([tensors[i] for i in level], dim=-1) for level in levels], 1)
    rows = torch.cat([level_rows(t) for t in tensors[1:]], dim=1)
    return torch.cat([tensors[0], rows], dim=-1)


def level_slices(shapes: list[tuple[int, ...]]) -> list[slice] | None:
    """Which of outputs of these shapes (batch first) make each level, where they are a
    head's levels given in parts (``level_groups``): a slice of the outputs per level."""
    groups = level_groups(shapes)
    if groups is None:
        return None
    return [slice(end - n, end) for n, end in zip(groups, itertools.accumulate(groups))]


def parts_joined(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A head's levels given in parts (``level_groups``): each level's parts joined along the
    channels, (N, sum C_i, h, w) per level."""
    levels = level_slices([tuple(t.shape) for t in tensors])
    if levels is None:
        raise ValueError("outputs are not a head's levels given in parts")
    return [torch.cat(tensors[level], dim=1) for level in levels]


def joined_details(names: list[str], shapes: list[tuple[int, ...]]) -> dict | None:
    """How a file's outputs of these names and shapes (batch first) join, for the teacher's
    details: under their kind's ``JOIN_KINDS`` key, each output's [name, channels]
    (``channels``) or [name, shape without the batch] (the other kinds); with the
    ``distilled_output`` it makes. None when they do not join."""
    kind = join_kind(shapes)
    if kind is None:
        return None
    if kind == "channels":
        outputs = [[n, int(s[-1])] for n, s in zip(names, shapes)]
    else:
        outputs = [[n, [int(d) for d in s[1:]]] for n, s in zip(names, shapes)]
    distilled = {"channels": "every output, joined along the last axis",
                 "levels": "every level's output, joined along the locations",
                 "levels_last": "every level's output (channels last), joined along the "
                                "locations",
                 "beside": "the decoded output, its levels' rows beside it",
                 "parts": "each level's parts joined along the channels, the levels along "
                          "the locations",
                 "rows": "each level's outputs joined along the channels, the levels along "
                         "the locations"}[kind]  # fmt: skip
    return {JOIN_KINDS[kind]: outputs, "distilled_output": distilled}


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


def level_rows(out: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """One per-level output as rows, row-major over its grid: (N, na, h, w, C) as (N, na * h
    * w, C), anchor by anchor as YOLOv5 lays its joined output out; (N, channels, h, w) as
    (N, h * w, channels), one row per cell, which the head's layout reads as its anchors'
    rows (``HeadLayout.locations_last``): how many anchors its channels hold is the layout's
    reading, not the join's; with ``channels_last``, (N, h, w, channels) as the same rows."""
    if out.dim() == 5 or channels_last:
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
