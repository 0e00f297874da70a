"""What is read of an ONNX model's declarations: a dimension's fixed size (``dim_size``), the
file loaded (``load_model``), the inputs a caller feeds (``model_inputs``), a fixed batch size
(``fixed_batch``), and, once quantised, the nodes still computing in float (``float_nodes``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from compress_toolbox.errors import QuantizeError, first_line


def dim_size(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """A declared dimension's fixed size; None where it is named, unset, or not positive
    (Paddle2ONNX declares a dynamic batch as -1)."""
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def load_model(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as error:
        raise QuantizeError(f"{path}: not a readable ONNX model ({first_line(error)})") from error


def model_inputs(path: Path, model: onnx.ModelProto) -> list[tuple[str, np.dtype]]:
    """(name, numpy dtype) of the inputs the caller feeds: graph inputs that are not weights."""
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        raise QuantizeError(f"{path}: already quantised (it has QuantizeLinear/DequantizeLinear)")
    weights = {init.name for init in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name not in weights:
            elem = value.type.tensor_type.elem_type
            inputs.append((value.name, onnx.helper.tensor_dtype_to_np_dtype(elem)))
    return inputs


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a model's first input (not an initializer listed as an input, as files
    of IR version 3 do) was exported with, or None where its first axis is dynamic."""
    weights = {init.name for init in model.graph.initializer}
    value = next((v for v in model.graph.input if v.name not in weights), None)
    dims = value.type.tensor_type.shape.dim if value is not None else []
    return dim_size(dims[0]) if dims else None


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
           onnx.TensorProto.BFLOAT16)  # fmt: skip


def _maybe_float(elem_type: int) -> bool:
    return elem_type in _FLOATS or elem_type == onnx.TensorProto.UNDEFINED


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor ONNX shape inference can type (weights included)."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # custom ops: keep what the file declares
        pass
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*graph.input, *graph.value_info, *graph.output]}  # fmt: skip
    return types | {t.name: t.data_type for t in graph.initializer}


def quantisable_op_types() -> frozenset[str]:
    """The op types ``quantize_static`` quantises by default in QDQ format (its own default
    ``op_types_to_quantize``: the QOperator and QDQ registries)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)


def node_label(node: onnx.NodeProto) -> str:
    """How the INT8 results name a node: its name, or its first output where it has none."""
    return node.name or node.output[0]


def float_nodes(quantised: onnx.ModelProto) -> tuple[tuple[str, str], ...]:
    """(name, op type) of the nodes of the QDQ model that compute in float: they read a float
    activation, and either onnxruntime has no quantised form of their op type or none of their
    float activations comes through a DequantizeLinear. Being surrounded by Q/DQ is not enough:
    an unsupported op between two quantised ones (DQ -> Sin -> Q) still computes in float."""
    types = _tensor_types(quantised)
    weights = {t.name for t in quantised.graph.initializer}
    producer = {out: node.op_type for node in quantised.graph.node for out in node.output}
    quantisable = quantisable_op_types()
    left = []
    for node in quantised.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        # activations: not weights, and float (or of unknown type, e.g. after a custom op)
        acts = [name for name in node.input if name and name not in weights
                and producer.get(name) != "Constant" and _maybe_float(types.get(name, 0))]
        if not acts or not any(_maybe_float(types.get(out, 0)) for out in node.output):
            continue  # shape arithmetic on int64, Shape of a float tensor and the like
        through_dq = any(producer.get(name) == "DequantizeLinear" for name in acts)
        if node.op_type not in quantisable or not through_dq:
            left.append((node_label(node), node.op_type))
    return tuple(left)
