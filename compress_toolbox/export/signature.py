"""A drop-in student: ``student.onnx`` takes and gives tensors of exactly the teacher file's
names, ranks, dtypes and shapes, so that the user's own code keeps working on it.

``signature`` reads a file's inputs and outputs (onnxruntime, with the shapes each gives at a
probe batch); ``adopt_names`` renames the student's inputs and outputs after the teacher's and
gives them its declared dimensions (symbolic names, a fixed batch); ``compare`` lists every
difference; ``take_teacher_signature`` does all three on an exported student. (A TensorFlow
teacher's channels-last input: ``layout.py``.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from compress_toolbox.export.onnx_inspect import dim_size
from compress_toolbox.export.writer import onnx_session

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


def declared_shape(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...]:
    """A value's declared dimensions: a size, a symbolic name, or None where unknown."""
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
        shape = _probe_shape(declared_shape(value), input_shape, batch)
        feed[meta.name] = np.zeros(shape, dtype=dtype)
    results = session.run(None, feed)
    inputs = tuple(TensorSpec(v.name, _type_name(v), declared_shape(v), feed[v.name].shape)
                   for v in graph_inputs)  # fmt: skip
    outputs = tuple(TensorSpec(v.name, _type_name(v), declared_shape(v), tuple(r.shape))
                    for v, r in zip(model.graph.output, results))  # fmt: skip
    return Signature(inputs, outputs)


def _type_name(value: onnx.ValueInfoProto) -> str:
    return onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()


def _rename_everywhere(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
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


def adopt_names(student_path: str | Path, teacher: Signature,
                output_name: str | None = None) -> None:  # fmt: skip
    """Rename the student file's inputs and outputs (in order) after the teacher's, with its
    declared dimensions (symbolic names, fixed sizes), in place. A student of one output
    whose teacher has several takes the name of the teacher's ``output_name`` (the one it
    was distilled on), where given."""
    model = onnx.load(str(student_path))
    graph = model.graph
    outputs = list(teacher.outputs)
    chosen = [spec for spec in outputs if spec.name == output_name]
    if len(graph.output) == 1 and chosen:
        outputs = chosen
    pairs = [*zip(graph.input, teacher.inputs), *zip(graph.output, outputs)]
    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    for value, spec in pairs:  # a name the student already uses elsewhere moves aside first
        if spec.name in taken and spec.name != value.name:
            _rename_everywhere(graph, spec.name, f"{spec.name}__student_internal")
    for value, spec in pairs:
        _rename_everywhere(graph, value.name, spec.name)
        _copy_declared_dims(value, spec)
    onnx.save_model(model, str(student_path))


def compare(student: Signature, teacher: Signature) -> list[str]:
    """Every way the student's signature differs from the teacher's (empty: identical). Where
    the counts differ, tensors are paired by name and each one the student lacks is named."""
    problems = []
    for kind in ("inputs", "outputs"):
        mine, theirs = getattr(student, kind), getattr(teacher, kind)
        pairs = list(zip(mine, theirs))
        if len(mine) != len(theirs):
            named = {spec.name: spec for spec in mine}
            pairs = [(named[t.name], t) for t in theirs if t.name in named]
            problems += [f"{kind[:-1]} {t.name}: missing" for t in theirs if t.name not in named]
            problems += [f"{kind[:-1]} {s.name}: not the teacher's" for s in mine
                         if s.name not in {t.name for t in theirs}]  # fmt: skip
        for s, t in pairs:
            problems += _differences(s, t, kind[:-1])
    return problems


def _differences(s: TensorSpec, t: TensorSpec, kind: str) -> list[str]:
    problems = [f"{kind} {t.name}: {field_name} {getattr(s, field_name)} != "
                f"{getattr(t, field_name)}" for field_name in ("name", "dtype", "at_probe")
                if getattr(s, field_name) != getattr(t, field_name)]  # fmt: skip
    if len(s.declared) != len(t.declared):
        problems.append(f"{kind} {t.name}: rank {len(s.declared)} != {len(t.declared)}")
    return problems


@dataclass(frozen=True)
class SignatureCheck:
    """An exported student given a teacher file's signature: the student's as written, and
    every way it still differs from the teacher's (empty: a drop-in replacement)."""

    student: Signature | None  # None: it could not be given the signature
    differences: tuple[str, ...]

    @property
    def same_as_teacher(self) -> bool:
        return not self.differences

    def as_report(self) -> dict:
        """For report.json's ``exported_as``."""
        found: dict = {"same_as_teacher": self.same_as_teacher}
        if self.student is not None:
            found["signature"] = self.student.as_dict()
        return {**found, "differences": list(self.differences)} if self.differences else found


def take_teacher_signature(student_path: str | Path, teacher_path: str | Path,
                           input_shape: tuple[int, ...],
                           output_name: str | None = None) -> SignatureCheck:  # fmt: skip
    """Give the ONNX file at ``student_path`` the names and declared dimensions of the teacher
    file at ``teacher_path`` (in place; ``output_name``: see ``adopt_names``), then compare the
    two, each run at the teacher's batch (a batch-1 export's 1, else ``PROBE_BATCH``) on
    ``input_shape`` (no batch)."""
    wanted = signature(teacher_path, input_shape)
    adopt_names(student_path, wanted, output_name)
    got = signature(student_path, input_shape, batch=wanted.inputs[0].at_probe[0])
    return SignatureCheck(got, tuple(compare(got, wanted)))

