"""Image layout of a shipped ONNX file. Every model here takes images channels first,
(N, C, H, W); a TensorFlow teacher's file takes them channels last, (N, H, W, C), and so does
its shipped student: ``take_channels_last_input`` puts a Transpose to channels first in front
of a written and checked file and marks it (``is_channels_last``); ``channels_first_copy``
takes that Transpose off again, for work that reads a file as channels first (quantising it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from compress_toolbox.errors import VerificationFailed
from compress_toolbox.export.onnx_names import GraphAdditions
from compress_toolbox.export.signature import PROBE_BATCH
from compress_toolbox.export.writer import onnx_session, session_batch
from compress_toolbox.load.importers.base import CHANNELS_LAST

LAYOUT_KEY = "dafl_compress.input_layout"  # the file's metadata: CHANNELS_LAST


def _image_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    initializers = {i.name for i in graph.initializer}
    (image,) = [v for v in graph.input if v.name not in initializers]
    return image


def _permute_dims(value: onnx.ValueInfoProto, order: tuple[int, ...]) -> None:
    dims = value.type.tensor_type.shape.dim
    declared = [onnx.TensorShapeProto.Dimension() for _ in dims]
    for copy, dim in zip(declared, dims):
        copy.CopyFrom(dim)
    for dim, source in zip(dims, order):
        dim.CopyFrom(declared[source])


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


def take_channels_last_input(path: str | Path, input_shape: tuple[int, ...],
                             shown_as: str | Path | None = None) -> None:  # fmt: skip
    """Make the ONNX file at ``path`` take its image input channels last, (N, H, W, C) where
    it took (N, C, H, W) (``input_shape``: C, H, W), in place: a Transpose to channels first
    read by everything that read the input, and the file marked so. Checked: on the same
    images both files give the same outputs (VerificationFailed naming ``shown_as`` or
    ``path`` otherwise). A file made so already is left as it is."""
    before = onnx.load(str(path))
    if _props(before).get(LAYOUT_KEY) == CHANNELS_LAST:
        return  # made so already
    model = onnx.ModelProto()
    model.CopyFrom(before)
    graph = model.graph
    image = _image_input(graph)
    add = GraphAdditions(graph)
    first = add.name(f"{image.name}_channels_first")
    _rename_reads(graph, image.name, first)
    add.node("Transpose", [image.name], [first], perm=[0, 3, 1, 2])
    graph.node.insert(0, graph.node.pop())  # topological order: it runs first
    _permute_dims(image, (0, 2, 3, 1))
    onnx.helper.set_model_props(model, {**_props(model), LAYOUT_KEY: CHANNELS_LAST})
    _check_same_answers(before, model, input_shape, shown_as or path)
    onnx.save_model(model, str(path))


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def is_channels_last(path: str | Path) -> bool:
    """Whether ``take_channels_last_input`` made the ONNX file at ``path`` channels last."""
    model = onnx.load(str(path), load_external_data=False)
    return _props(model).get(LAYOUT_KEY) == CHANNELS_LAST


def channels_first_copy(path: str | Path, out: str | Path) -> None:
    """The channels-last file at ``path`` (``take_channels_last_input``) written to ``out``
    as it was before: its first Transpose taken off, the input channels first."""
    model = onnx.load(str(path))
    graph = model.graph
    image = _image_input(graph)
    transpose = graph.node[0]
    if transpose.op_type != "Transpose" or list(transpose.input) != [image.name]:
        raise VerificationFailed(f"{path}: marked channels last, but its first node is not the "
                                 "Transpose of its input")  # fmt: skip
    del graph.node[0]
    _rename_reads(graph, transpose.output[0], image.name)
    _permute_dims(image, (0, 3, 1, 2))
    props = {k: v for k, v in _props(model).items() if k != LAYOUT_KEY}
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save_model(model, str(out))


def _check_same_answers(channels_first: onnx.ModelProto, channels_last: onnx.ModelProto,
                        input_shape: tuple[int, ...], path: str | Path) -> None:  # fmt: skip
    # not optimised: both files then compute the same ops on the same values (an INT8 file's
    # rounding could otherwise differ by a step between two differently optimised graphs)
    first, last = (onnx_session(m.SerializeToString(), optimised=False)
                   for m in (channels_first, channels_last))  # fmt: skip
    batch = session_batch(first) or PROBE_BATCH
    x = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
    expected = first.run(None, {first.get_inputs()[0].name: x})
    got = last.run(None, {last.get_inputs()[0].name: x.transpose(0, 2, 3, 1).copy()})
    for want, have in zip(expected, got):
        if want.shape != have.shape or not np.allclose(want, have, rtol=1e-5, atol=1e-6):
            raise VerificationFailed(f"{path}: made channels last, it no longer gives the "
                                     "same outputs")  # fmt: skip
