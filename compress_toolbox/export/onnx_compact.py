"""A smaller file for the same INT8 graph.

onnxruntime's QDQ models of small students are mostly bookkeeping: every weight and bias gets
a per-channel zero point that is all zeros, and every tensor and node a long name
(``/features/features.0/Conv_output_0_QuantizeLinear``). On the suite's students that put the
INT8 file at 0.35-0.48 of the float file where the weights alone are 0.25. ``compact`` drops
the zero points equal to their op's default (all zeros; of uint8 for QuantizeLinear),
attributes set to their schema default, opset imports no node uses and the shape
annotations, and renames the internal tensors with short ids; the graph's inputs and outputs
keep their names, and nodes keep theirs where asked (those the report names).
"""

from __future__ import annotations

from collections.abc import Collection

import onnx
from onnx import defs, helper, numpy_helper


def _is_default_zero_point(node: onnx.NodeProto, zero_point: onnx.TensorProto | None) -> bool:
    """Whether ``zero_point`` (a constant, or None) is what ``node`` assumes without one: all
    zeros for DequantizeLinear; all zeros of uint8 for QuantizeLinear (its type sets the
    output's)."""
    if zero_point is None or numpy_helper.to_array(zero_point).any():
        return False
    return node.op_type == "DequantizeLinear" or zero_point.data_type == onnx.TensorProto.UINT8


def _drop_zero_points(graph: onnx.GraphProto) -> None:
    """Zero points equal to the default of their QuantizeLinear/DequantizeLinear."""
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) == 3:
            if _is_default_zero_point(node, initializers.get(node.input[2])):
                del node.input[2]
    used = {name for node in graph.node for name in node.input}
    used |= {value.name for value in graph.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)


def _drop_default_attributes(model: onnx.ModelProto) -> None:
    """Attributes equal to the default their op's schema declares (at the model's opset)."""
    versions = {opset.domain: opset.version for opset in model.opset_import}
    for node in model.graph.node:
        try:
            schema = defs.get_schema(node.op_type, versions.get(node.domain, 1), node.domain)
        except defs.SchemaError:  # an op onnx does not know (a runtime's contrib op)
            continue
        for attr in list(node.attribute):
            declared = schema.attributes.get(attr.name)
            default = declared.default_value if declared is not None else None
            if (default is not None and default.type == attr.type
                    and helper.get_attribute_value(default) == helper.get_attribute_value(attr)):
                node.attribute.remove(attr)


def _drop_unused_opsets(model: onnx.ModelProto) -> None:
    """Opset imports of domains no node uses (onnxruntime's quantiser adds eight)."""
    used = {node.domain for node in model.graph.node} | {""}
    for opset in [opset for opset in model.opset_import if opset.domain not in used]:
        model.opset_import.remove(opset)


def _short_names(graph: onnx.GraphProto, keep_nodes: Collection[str]) -> None:
    """Internal tensors renamed 0, 1, ... (hex); node names cleared except ``keep_nodes``."""
    kept = {value.name for value in (*graph.input, *graph.output)}
    names: dict[str, str] = {}

    taken = set(kept)

    def short(name: str) -> str:
        if not name or name in kept:
            return name
        if name not in names:
            number = len(taken)
            while format(number, "x") in taken:  # an input or output named like an id
                number += 1
            names[name] = format(number, "x")
            taken.add(names[name])
        return names[name]

    for node in graph.node:
        if node.name not in keep_nodes:
            node.name = ""
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
    for init in graph.initializer:
        init.name = short(init.name)
    del graph.value_info[:]


def compact(model: onnx.ModelProto, keep_nodes: Collection[str] = ()) -> bool:
    """Make ``model`` (in place) smaller without changing what it computes; return whether it
    did (a graph with subgraphs, If or Loop, is left alone: their bodies read outer names)."""
    graph = model.graph
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for attr in node.attribute):  # fmt: skip
        return False
    _drop_zero_points(graph)
    _drop_default_attributes(model)
    _drop_unused_opsets(model)
    _short_names(graph, set(keep_nodes))
    return True
