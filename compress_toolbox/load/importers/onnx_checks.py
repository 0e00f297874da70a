"""What an ONNX file asks of the machine, checked before anything of it runs.

A few hundred bytes of ONNX can declare a 64 GiB weight, ask ``ConstantOfShape`` for 16 GiB,
or wire its nodes into a cycle; onnx2torch and onnxruntime then crash, allocate until the
machine swaps, or never return. Each check here refuses such a file with one line naming it.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
import torch

from compress_toolbox.errors import ImportFailed
from compress_toolbox.export.onnx_inspect import dim_size
from compress_toolbox.limits import available_memory

MEMORY_SHARE = 0.5  # one tensor, or all weights, may take at most this share of free memory
SHAPE_CHECK_MAX_BYTES = 2**30  # shape inference copies the model: skip it on larger files


def check_model(model: onnx.ModelProto, path: Path, input_shape: tuple[int, ...]) -> None:
    """Refuse ``model`` (one ImportFailed line naming ``path``) if its graph has a cycle, an
    initializer declares more data than it holds, its weights or any tensor it computes from
    constants would not fit in half of the free memory."""
    check_acyclic(model.graph, path)
    limit = _memory_limit()
    check_initializers(model.graph, path, limit)
    if model.ByteSize() <= SHAPE_CHECK_MAX_BYTES:
        check_tensor_sizes(model, path, input_shape, limit)


def _op_types(graph: onnx.GraphProto):
    """The op types of ``graph``'s nodes and of those in its subgraphs (If and Loop bodies)."""
    for node in graph.node:
        yield node.op_type
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for subgraph in (*subgraphs, *attribute.graphs):
                yield from _op_types(subgraph)


def check_raw_outputs(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a graph that runs NonMaxSuppression: its outputs are detections after NMS (as
    torchvision's detection models exported whole give them), a variable number per image,
    where a student is distilled on the raw outputs before decoding and NMS."""
    if "NonMaxSuppression" not in set(_op_types(model.graph)):
        return
    outputs = ", ".join(f"'{out.name}'" for out in model.graph.output)
    raise ImportFailed(
        f"{path}: the graph runs NonMaxSuppression, so its outputs ({outputs}) are detections "
        "after NMS; a student is distilled on a detector's raw head outputs: export the model "
        "without NMS (ultralytics: nms=False; torchvision: a class returning its head, "
        "docs/detection.md; two-stage detectors such as Faster R-CNN are not supported yet)"
    )


def _memory_limit() -> float:
    free = available_memory(torch.device("cpu"))
    return math.inf if free is None else free * MEMORY_SHARE


def _nbytes(dims, data_type: int) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    return math.prod(int(d) for d in dims) * itemsize


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def check_acyclic(graph: onnx.GraphProto, path: Path) -> None:
    """Every node's inputs must come from the graph's inputs, its initializers or nodes that
    can run before it (Kahn's algorithm; node order in the file does not matter)."""
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    available.add("")  # an omitted optional input
    waiting_on: dict[str, list[int]] = {}
    missing = []
    for index, node in enumerate(graph.node):
        pending = {name for name in node.input if name not in available}
        missing.append(len(pending))
        for name in pending:
            waiting_on.setdefault(name, []).append(index)
    ready = [index for index, count in enumerate(missing) if count == 0]
    while ready:
        for name in graph.node[ready.pop()].output:
            for index in waiting_on.pop(name, []):
                missing[index] -= 1
                if missing[index] == 0:
                    ready.append(index)
    stuck = next((i for i, count in enumerate(missing) if count > 0), None)
    if stuck is not None:
        node = graph.node[stuck]
        name = next(name for name in node.input if name in waiting_on)
        raise ImportFailed(
            f"{path}: not a valid ONNX graph: node '{node.name or node.op_type}' reads "
            f"'{name}', which no node computes before it (a cycle or a dangling input)"
        )


def check_initializers(graph: onnx.GraphProto, path: Path, limit: float) -> None:
    """Each initializer holds the data its dims declare, and all of them fit in ``limit``."""
    total = 0
    for init in graph.initializer:
        declared = _nbytes(init.dims, init.data_type)
        total += declared
        external = init.data_location == onnx.TensorProto.EXTERNAL
        if init.HasField("raw_data") and not external and len(init.raw_data) != declared:
            raise ImportFailed(
                f"{path}: initializer '{init.name}' declares {list(init.dims)} "
                f"({_gib(declared)}) but holds {len(init.raw_data):,} bytes"
            )
        if declared > limit:
            raise ImportFailed(
                f"{path}: initializer '{init.name}' needs {_gib(declared)}, more than half of "
                f"the free memory ({_gib(2 * limit)})"
            )
    if total > limit:
        raise ImportFailed(f"{path}: the weights need {_gib(total)}, more than half of the free "
                           f"memory ({_gib(2 * limit)})")  # fmt: skip


def check_tensor_sizes(model: onnx.ModelProto, path: Path, input_shape: tuple[int, ...],
                       limit: float) -> None:  # fmt: skip
    """Shapes inferred at batch 1 (constants propagated, so ``ConstantOfShape``, ``Expand``,
    ``Tile``, ``Range`` of constant sizes are known): no computed tensor may exceed ``limit``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    _fix_input_shape(probe.graph, (1, *input_shape))
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; the converters check the rest
        return
    producers = {name: node for node in model.graph.node for name in node.output}
    for value in (*inferred.graph.value_info, *inferred.graph.output):
        tensor = value.type.tensor_type
        dims = [dim_size(d) for d in tensor.shape.dim]
        if not tensor.elem_type or not tensor.HasField("shape") or None in dims:
            continue
        size = _nbytes(dims, tensor.elem_type)
        if size > limit:
            node = producers.get(value.name)
            what = f"{node.op_type} node '{node.name or value.name}'" if node else value.name
            raise ImportFailed(
                f"{path}: {what} computes a {dims} tensor ({_gib(size)} at batch 1), more than "
                f"half of the free memory ({_gib(2 * limit)})"
            )


def _fix_input_shape(graph: onnx.GraphProto, shape: tuple[int, ...]) -> None:
    initializers = {init.name for init in graph.initializer}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in initializers or len(dims) != len(shape):
            continue
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = size
