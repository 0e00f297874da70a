"""Free the batch of an ONNX graph exported at a fixed batch B, mostly 1 (ultralytics' default
export, and most exporters' when no dynamic axis is asked for): such a graph reshapes to target
shapes that start with a literal B, so it cannot compute another batch, which training needs.

The rewrite: declared batch dimensions of B become symbolic, and every Reshape whose target
shape is a constant starting with B, applied to a tensor computed from the input whose first
dimension is B, gets 0 there instead ("copy the input's first dimension", the ONNX default
``allowzero=0``, which such a Reshape is then given). At batch B the graph computes exactly
what it did; whether it now computes any batch correctly is for the caller to check against the
original on the same samples.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from compress_toolbox.export.onnx_inspect import dim_size


def free_batch(model: onnx.ModelProto, batch: int = 1) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model``, exported at ``batch``, with its batch freed as described above, and
    the number of Reshape targets rewritten (0: nothing to rewrite, the copy only declares a
    symbolic batch)."""
    freed = onnx.ModelProto()
    freed.CopyFrom(model)
    graph = freed.graph
    first_dims = _first_dims(freed)
    constants = _constant_tensors(graph)
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        target = numpy_helper.to_array(constants[node.input[1]])
        data_first = first_dims.get(node.input[0])
        if target.ndim == 1 and target.size and target[0] == batch and data_first == batch:
            new = _batch_copied(node, target)
            if new is not None:
                _replace_constant(graph, node, new)
                rewritten += 1
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_value == batch:
            dims[0].dim_param = "batch"
    del graph.value_info[:]  # inferred at the fixed batch: stale now
    return freed, rewritten


def _batch_copied(node: onnx.NodeProto, target: np.ndarray) -> np.ndarray | None:
    """``target`` with its first entry 0, copying the input's first dimension, the Reshape
    made to read 0 so (``allowzero=0``: torch's dynamo exporter writes every ``view`` with
    ``allowzero=1``); None where the target holds another 0 that ``allowzero=1`` keeps
    literal."""
    allowzero = next((a for a in node.attribute if a.name == "allowzero"), None)
    if allowzero is not None and allowzero.i and (target[1:] == 0).any():
        return None  # a literal 0 (an empty axis): allowzero must stay, and forbids -1 beside it
    if allowzero is not None:
        allowzero.i = 0
    new = target.copy()
    new[0] = 0
    return new


def _first_dims(model: onnx.ModelProto) -> dict[str, int | None]:
    """The first dimension of every tensor computed from the graph's inputs (initializers and
    constants are left out: a reshape of a weight is not the batch's business)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    fixed = {init.name for init in graph.initializer}
    fixed |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    dims: dict[str, int | None] = {}
    for value in (*graph.input, *graph.value_info):
        if value.name in fixed:
            continue
        shape = value.type.tensor_type.shape.dim
        dims[value.name] = dim_size(shape[0]) if shape else None
    return dims


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    tensors = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                tensors[node.output[0]] = value
    return tensors


def _replace_constant(graph: onnx.GraphProto, node: onnx.NodeProto, target: np.ndarray) -> None:
    """Give ``node`` its own target-shape initializer (the old one may be shared)."""
    name = f"{node.input[1]}__batch_freed_{len(graph.initializer)}"
    graph.initializer.append(numpy_helper.from_array(target.astype(np.int64), name))
    node.input[1] = name
