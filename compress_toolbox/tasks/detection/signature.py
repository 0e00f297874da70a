"""A drop-in student: ``student.onnx`` takes and gives tensors of exactly the teacher file's
names, ranks, dtypes and shapes, so the user's own decoding and NMS keep working on it.

``signature`` reads a file's inputs and outputs (onnxruntime, with the shapes each gives at a
probe batch); ``split_outputs`` gives a student distilled on a teacher's joined outputs (boxes
and scores, levels, a decoded output and its levels) the teacher's separate outputs back;
``adopt_names`` renames the student's inputs and outputs after the teacher's and gives them its
symbolic dimension names; ``compare`` lists every difference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from compress_toolbox.export.onnx_inspect import dim_size
from compress_toolbox.export.onnx_names import GraphAdditions
from compress_toolbox.export.writer import onnx_session
from compress_toolbox.tasks.detection.heads import HeadLayout
from compress_toolbox.tasks.outputs import channels_last as channels_last_shape
from compress_toolbox.tasks.outputs import level_locations

PROBE_BATCH = 2


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, element type, declared shape (str: symbolic), and the shape
    it has when the model runs at ``PROBE_BATCH``."""

    name: str
    dtype: str
    declared: tuple[int | str | None, ...]
    at_probe: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Signature:
    """A model file's inputs and outputs."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def as_dict(self) -> dict:
        """For report.json."""
        return asdict(self)


def _declared(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...]:
    return tuple(d.dim_param or dim_size(d) for d in value.type.tensor_type.shape.dim)


def _probe_shape(declared: tuple, input_shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    dims = (batch, *input_shape)
    return tuple(d if isinstance(d, int) and d > 0 else dims[i]
                 for i, d in enumerate(declared))  # fmt: skip


def signature(path: str | Path, input_shape: tuple[int, ...],
              batch: int = PROBE_BATCH) -> Signature:  # fmt: skip
    """The inputs and outputs of the ONNX file at ``path``, run once at ``batch`` (where the
    file does not fix its own, as ultralytics' batch-1 exports do) on zeros of
    ``input_shape`` (no batch) to learn the output shapes."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in initializers]
    session = onnx_session(path)
    feed = {}
    for value, meta in zip(graph_inputs, session.get_inputs()):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feed[meta.name] = np.zeros(_probe_shape(_declared(value), input_shape, batch), dtype=dtype)
    results = session.run(None, feed)
    inputs = tuple(TensorSpec(v.name, _type_name(v), _declared(v), feed[v.name].shape)
                   for v in graph_inputs)  # fmt: skip
    outputs = tuple(TensorSpec(v.name, _type_name(v), _declared(v), tuple(r.shape))
                    for v, r in zip(model.graph.output, results))  # fmt: skip
    return Signature(inputs, outputs)


def _type_name(value: onnx.ValueInfoProto) -> str:
    return onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()


def _rename_everywhere(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.input, *graph.output):
        if value.name == old:
            value.name = new


def _copy_declared_dims(value: onnx.ValueInfoProto, like: TensorSpec) -> None:
    """The teacher's declared dims on the student's: its symbolic names (also where the
    student's exporter proved a size constant), and its fixed sizes where the student's is
    symbolic. Sizes that differ at run time are left for ``compare`` to report."""
    for dim, wanted in zip(value.type.tensor_type.shape.dim, like.declared):
        if isinstance(wanted, str) and wanted:
            dim.dim_param = wanted  # one of the two: this clears dim_value
        elif isinstance(wanted, int) and wanted > 0 and dim.dim_param:
            dim.dim_value = wanted  # one of the two: this clears dim_param


def adopt_names(student_path: str | Path, teacher: Signature) -> None:
    """Rename the student file's inputs and outputs (in order) after the teacher's, with its
    declared dimensions (symbolic names, fixed sizes), in place."""
    model = onnx.load(str(student_path))
    graph = model.graph
    pairs = [*zip(graph.input, teacher.inputs), *zip(graph.output, teacher.outputs)]
    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    for value, spec in pairs:  # a name the student already uses elsewhere moves aside first
        if spec.name in taken and spec.name != value.name:
            _rename_everywhere(graph, spec.name, f"{spec.name}__student_internal")
    for value, spec in pairs:
        _rename_everywhere(graph, value.name, spec.name)
        _copy_declared_dims(value, spec)
    onnx.save_model(model, str(student_path))


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
        shapes = [[*_declared(whole)[:-1], layout.row],
                  *_split_levels(model, add, raw, layout.beside, names[1:])]  # fmt: skip
    else:
        sizes = layout.part_sizes()
        _split(model, add, whole.name, sizes, names, axis=-1)
        shapes = [[*_declared(whole)[:-1], size] for size in sizes]
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
    return [[_declared(add.graph.output[0])[0], *shape] for shape in shapes]


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
    batch = _declared(add.graph.output[0])[0]
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


def compare(student: Signature, teacher: Signature) -> list[str]:
    """Every way the student's signature differs from the teacher's (empty: identical)."""
    problems = []
    for kind in ("inputs", "outputs"):
        mine, theirs = getattr(student, kind), getattr(teacher, kind)
        if len(mine) != len(theirs):
            problems.append(f"{len(mine)} {kind} where the teacher has {len(theirs)}")
            continue
        for s, t in zip(mine, theirs):
            for field_name in ("name", "dtype", "at_probe"):
                if getattr(s, field_name) != getattr(t, field_name):
                    problems.append(f"{kind[:-1]} {t.name}: {field_name} "
                                    f"{getattr(s, field_name)} != {getattr(t, field_name)}")
            if len(s.declared) != len(t.declared):
                problems.append(f"{kind[:-1]} {t.name}: rank {len(s.declared)} != "
                                f"{len(t.declared)}")  # fmt: skip
    return problems
