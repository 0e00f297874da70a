"""The student of a detector whose import joined several outputs into one (boxes and scores,
a head's levels, a decoded output beside its levels), given the teacher's separate outputs back
(``split_outputs``); ``export/signature.py`` then gives it the rest of an ONNX teacher's
signature.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from compress_toolbox.export.onnx_names import GraphAdditions
from compress_toolbox.export.signature import declared_shape
from compress_toolbox.tasks.detection.heads import HeadLayout
from compress_toolbox.tasks.outputs import channels_last as channels_last_shape
from compress_toolbox.tasks.outputs import level_locations


def split_outputs(student_path: str | Path, layout: HeadLayout) -> None:
    """Split the student file's one output back into the teacher's outputs, named as the
    teacher's (``layout.outputs``), in place: the teacher's outputs joined along their last
    axis (``layout``: how many channels each had, in the file's order) by an ONNX Split; a
    YOLO head's levels joined along the locations by ``_split_levels`` (given in parts: each
    level split again along the channels); a head's levels given as rows split along the
    locations, then each level along the channels (``_split_row_levels``); a decoded output's
    rows and its levels' rows beside them split in two, then the levels'. ``adopt_names``
    then gives them the rest of an ONNX teacher's signature."""
    model = onnx.load(str(student_path))
    graph = model.graph
    (whole,) = graph.output
    add = GraphAdditions(graph)
    names = [add.name(name) for name in layout.outputs]
    if layout.level_parts:
        shapes = _split_level_parts(model, add, whole.name, layout, names)
    elif layout.levels:
        shapes = _split_levels(model, add, whole.name, layout.levels, names,
                               layout.channels_last)  # fmt: skip
    elif layout.row_shapes:
        shapes = _split_row_levels(model, add, whole.name, layout, names)
    elif layout.beside:  # the decoded half, then the levels' rows
        raw = add.name(f"{names[0]}_level_rows")
        _split(model, add, whole.name, [layout.row, layout.row], [names[0], raw], axis=-1)
        shapes = [[*declared_shape(whole)[:-1], layout.row],
                  *_split_levels(model, add, raw, layout.beside, names[1:])]  # fmt: skip
    else:
        sizes = layout.part_sizes()
        _split(model, add, whole.name, sizes, names, axis=-1)
        shapes = [[*declared_shape(whole)[:-1], size] for size in sizes]
    element = whole.type.tensor_type.elem_type
    del graph.output[:]
    graph.output.extend(onnx.helper.make_tensor_value_info(name, element, shape)
                        for name, shape in zip(names, shapes))  # fmt: skip
    onnx.save_model(model, str(student_path))


def _split(model: onnx.ModelProto, add: GraphAdditions, source: str, sizes: list[int],
           outputs: list[str], axis: int) -> None:  # fmt: skip
    """An ONNX Split of ``source`` along ``axis`` into ``sizes``, named ``outputs`` (names
    already reserved), added by ``add``."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 13:  # the sizes became an input at opset 13
        add.node("Split", [source, add.const(f"{source}_split_sizes", sizes)], outputs, axis=axis)
    else:
        add.node("Split", [source], outputs, axis=axis, split=sizes)


def _split_levels(model: onnx.ModelProto, add: GraphAdditions, whole: str,
                  levels: tuple[tuple[int, ...], ...], names: list[str],
                  last: bool = False) -> list[list[int | str]]:  # fmt: skip
    """Nodes (``add``) giving the rows ``whole`` back as the head's per-level outputs
    ``names``, each (N, anchors, h, w, C) or (N, channels, h, w) of the shapes ``levels`` (the
    inverse of ``level_rows``, at the input size the student is exported for), or with
    ``last`` (N, h, w, channels) (``levels`` still channels first); their shapes."""
    rows = [add.name(f"{name}_rows") for name in names]
    _split(model, add, whole, [level_locations(shape) for shape in levels], rows, axis=1)
    shapes = [channels_last_shape(shape) if last else shape for shape in levels]
    for name, level, shape in zip(names, rows, shapes):
        if len(shape) == 3 and not last:  # (N, h * w, channels): the channels before the cells
            level = add.node("Transpose", [level], f"{name}_channels_first", perm=[0, 2, 1])
        add.node("Reshape", [level, add.const(f"{name}_shape", [0, *shape])], [name])
    return [[declared_shape(add.graph.output[0])[0], *shape] for shape in shapes]


def _split_row_levels(model: onnx.ModelProto, add: GraphAdditions, whole: str,
                      layout: HeadLayout, names: list[str]) -> list[list[int | str]]:  # fmt: skip
    """Nodes (``add``) giving the rows ``whole`` back as a head's outputs given per level as
    rows (``layout.row_shapes``): the levels' rows, then each level's outputs along the
    channels, named ``names`` in the file's order; their shapes."""
    shapes, levels = layout.row_shapes, layout.row_levels
    rows = [add.name(f"{names[level[0]]}_level") for _, level in levels]
    _split(model, add, whole, [count for count, _ in levels], rows, axis=1)
    for (_, level), level_rows in zip(levels, rows):
        _split(model, add, level_rows, [shapes[i][1] for i in level],
               [names[i] for i in level], axis=-1)  # fmt: skip
    batch = declared_shape(add.graph.output[0])[0]
    return [[batch, *shape] for shape in shapes]


def _split_level_parts(model: onnx.ModelProto, add: GraphAdditions, whole: str,
                       layout: HeadLayout, names: list[str]) -> list[list[int | str]]:  # fmt: skip
    """Nodes (``add``) giving the rows ``whole`` back as each level's parts ``names`` (a
    head's levels given in parts: ``layout.level_parts`` channels each); the parts' shapes."""
    n = len(layout.level_parts)
    levels = [add.name(f"{names[i * n]}_level") for i in range(len(layout.levels))]
    shapes = _split_levels(model, add, whole, layout.levels, levels)
    parts = []
    for i, (level, (batch, _, *grid)) in enumerate(zip(levels, shapes)):
        _split(model, add, level, list(layout.level_parts), names[i * n : (i + 1) * n], axis=1)
        parts.extend([batch, channels, *grid] for channels in layout.level_parts)
    return parts
