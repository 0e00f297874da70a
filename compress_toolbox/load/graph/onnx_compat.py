"""ONNX -> editable PyTorch (torch.fx) through onnx2torch, extended to the opsets torch 2.14 writes.

onnx2torch 1.5.15 stops at opset ~17 for most ops, so a model from torch's default (dynamo)
exporter, opset 20, fails on ReduceMean-18, Reshape-19, Identity-19, AveragePool-19 and more.
We close that gap in onnx2torch's own converter registry:

* most newer op versions only add tensor types (bfloat16, int4, ...): they reuse the converter
  of the newest version onnx2torch knows (``_register_newer_versions``);
* versions that change the op's interface get a converter here (Reduce*-18: axes became an input;
  AveragePool-19: dilations; Resize-18/19: new attributes, only their default values are accepted).

Graph clean-ups onnx2torch needs are done on the ONNX model first (``prepare_onnx_model``): Identity
nodes over initializers (the legacy exporter writes them for shared weights, and onnx2torch's Conv
converter then cannot find its weight) are bypassed, and Constant nodes become initializers.
Numerics are checked against onnxruntime by the caller, so any converter that silently differs fails
loudly at import time.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
from onnx import defs, numpy_helper
from onnx2torch.node_converters import registry
from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value
from torch import nn

from compress_toolbox.errors import ImportFailed
from compress_toolbox.load.graph.constant_args import static_pads, static_resizes
from compress_toolbox.load.graph.decompositions import fuse_decompositions
from compress_toolbox.load.graph.shape_agnostic import make_shape_agnostic

_REDUCE_OPS = (
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
)


class _Gelu(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate=self.approximate)


def _convert_reduce_axes_input(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Reduce*-18: ``axes`` is an optional input instead of an attribute."""
    axes = None
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            axes = get_const_value(node.input_values[1], graph).tolist()
        except KeyError as error:
            raise NotImplementedError(
                f"{node.operation_type} with axes computed at run time"
            ) from error
    if not axes and node.attributes.get("noop_with_empty_axes", 0):
        raise NotImplementedError(f"{node.operation_type} with noop_with_empty_axes=1")
    module = OnnxReduceStaticAxes(node.operation_type, axes, node.attributes.get("keepdims", 1))
    return OperationConverterResult(
        torch_module=module,
        onnx_mapping=_mapping(node, inputs=node.input_values[:1]),
    )


def _mapping(node: OnnxNode, inputs=None):
    return OnnxMapping(
        inputs=tuple(inputs if inputs is not None else node.input_values),
        outputs=node.output_values,
    )


def _convert_gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    del graph
    approximate = node.attributes.get("approximate", "none")
    return OperationConverterResult(torch_module=_Gelu(approximate), onnx_mapping=_mapping(node))


def _convert_layer_norm(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """LayerNormalization-17 with constant scale (and bias) over the last dims: an
    ``nn.LayerNorm`` shaped like its scale, which torch-pruning shrinks with its channels.
    onnx2torch's own converter reads the normalised shape from the input's value_info, which is
    unknown when sizes are computed at run time (it then builds ``normalized_shape=[0]``)."""
    axis = node.attributes.get("axis", -1)
    scale_name, *rest = node.input_values[1:]
    bias_name = rest[0] if rest and rest[0] else None
    constant = scale_name in graph.initializers and (
        bias_name is None or bias_name in graph.initializers
    )
    scale = graph.initializers[scale_name].to_torch() if constant else None
    if scale is None or axis != -scale.dim():  # e.g. a positive axis: rank needed, keep theirs
        return _ONNX2TORCH_LAYER_NORM(node, graph)
    module = nn.LayerNorm(tuple(scale.shape), eps=node.attributes.get("epsilon", 1e-5),
                          bias=bias_name is not None)  # fmt: skip
    with torch.no_grad():
        module.weight.copy_(scale)
        if bias_name is not None:
            module.bias.copy_(graph.initializers[bias_name].to_torch())
    return OperationConverterResult(
        torch_module=module, onnx_mapping=_mapping(node, inputs=node.input_values[:1])
    )


def _convert_matmul(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """MatMul by a constant 2-D weight that onnx_cleanup left (its MatMul+Add -> Gemm rewrite
    takes 2-D inputs only; token-wise MLPs and ConvNeXt's channel-last ones have 3-D or 4-D
    inputs): an ``nn.Linear`` without bias, so torch-pruning sees a layer it can shrink; a
    following bias Add stays a per-channel constant, which make_student shrinks with it.
    Other MatMuls (attention's q @ k) keep onnx2torch's converter."""
    constant = graph.initializers.get(node.input_values[1])
    weight = None if constant is None else constant.to_torch()
    if weight is None or weight.dim() != 2 or not weight.is_floating_point():
        return _ONNX2TORCH_MATMUL(node, graph)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight.T)
    return OperationConverterResult(
        torch_module=linear, onnx_mapping=_mapping(node, inputs=node.input_values[:1])
    )


def _delegating(op_type: str, version: int, check=None):
    """A converter that checks ``node`` then hands it to onnx2torch's converter of ``version``."""
    old = registry._CONVERTER_REGISTRY[registry.OperationDescription("", op_type, version)]

    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        if check is not None:
            problem = check(node)
            if problem:
                raise NotImplementedError(problem)
        return old(node, graph)

    return convert


def _check_pool_dilations(node: OnnxNode) -> str | None:
    if any(d != 1 for d in node.attributes.get("dilations", [])):
        return "AveragePool with dilations"
    return None


def _check_resize(node: OnnxNode) -> str | None:
    attrs = node.attributes
    if attrs.get("antialias", 0):
        return "Resize with antialias=1"
    if attrs.get("axes") is not None:
        return "Resize with axes"
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "Resize with keep_aspect_ratio_policy"
    if attrs.get("coordinate_transformation_mode") == "half_pixel_symmetric":
        return "Resize with half_pixel_symmetric coordinates"
    return None


def _check_pad(node: OnnxNode) -> str | None:
    if len(node.input_values) > 3 and node.input_values[3]:
        return "Pad with axes"
    if node.attributes.get("mode", "constant") == "wrap":
        return "Pad with mode=wrap"
    return None


def _schema_versions(op_type: str) -> list[int]:
    return sorted(
        {
            s.since_version
            for s in defs.get_all_schemas_with_history()
            if s.name == op_type and s.domain == ""
        }
    )


def _register(op_type: str, version: int, converter) -> None:
    key = registry.OperationDescription("", op_type, version)
    if key not in registry._CONVERTER_REGISTRY:
        registry._CONVERTER_REGISTRY[key] = converter


def _op(op_type: str, version: int) -> registry.OperationDescription:
    return registry.OperationDescription("", op_type, version)


_LAYER_NORM_17 = _op("LayerNormalization", 17)
_ONNX2TORCH_LAYER_NORM = registry._CONVERTER_REGISTRY[_LAYER_NORM_17]
_ONNX2TORCH_MATMUL = registry._CONVERTER_REGISTRY[_op("MatMul", 13)]


def _register_newer_versions() -> None:
    known: dict[str, list[int]] = {}
    for key in registry._CONVERTER_REGISTRY:
        if key.domain == "":
            known.setdefault(key.operation_type, []).append(key.version)
    special_checks = {
        "AveragePool": _check_pool_dilations,
        "Resize": _check_resize,
        "Pad": _check_pad,
    }
    for op_type, versions in known.items():
        newest = max(versions)
        for version in _schema_versions(op_type):
            if version <= newest:
                continue
            if op_type in _REDUCE_OPS and version >= 18:
                _register(op_type, version, _convert_reduce_axes_input)
            elif op_type == "GridSample":
                continue
            else:
                check = special_checks.get(op_type)
                _register(op_type, version, _delegating(op_type, newest, check))
    for version in _schema_versions("Gelu"):
        _register("Gelu", version, _convert_gelu)
    # these replace onnx2torch's own converters (see their docstrings)
    registry._CONVERTER_REGISTRY[_LAYER_NORM_17] = _convert_layer_norm
    for version in _schema_versions("MatMul"):
        registry._CONVERTER_REGISTRY[_op("MatMul", version)] = _convert_matmul


_register_newer_versions()


def _expose_exporting_opset() -> None:
    """onnx2torch's custom ONNX exports (Expand, Squeeze, ... in the legacy exporter) read the
    opset being written from ``torch.onnx.symbolic_helper.GLOBALS`` (or its older
    ``_export_onnx_opset_version``); torch 2.14 keeps it in
    ``torch.onnx._internal.torchscript_exporter._globals`` instead, so the legacy export of an
    imported graph failed with an AttributeError. Point it there."""
    from torch.onnx import symbolic_helper

    if any(hasattr(symbolic_helper, n) for n in ("GLOBALS", "_export_onnx_opset_version")):
        return
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    symbolic_helper.GLOBALS = GLOBALS


_expose_exporting_opset()


# Constant's literal attributes and the tensor type each one holds.
_LITERAL_TYPES = {
    "value_float": onnx.TensorProto.FLOAT,
    "value_floats": onnx.TensorProto.FLOAT,
    "value_int": onnx.TensorProto.INT64,
    "value_ints": onnx.TensorProto.INT64,
}


def _const_to_initializer(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
        elif attr.name in _LITERAL_TYPES:
            value = onnx.helper.get_attribute_value(attr)
            values, dims = (value, [len(value)]) if isinstance(value, list) else ([value], [])
            tensor = onnx.helper.make_tensor("", _LITERAL_TYPES[attr.name], dims, values)
        else:
            return None
        tensor.name = node.output[0]
        return tensor
    return None


def prepare_onnx_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy with Constant nodes as initializers and Identity nodes bypassed."""
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)  # the caller's model stays as it is: it is verified against
    graph = model_copy.graph
    graph_outputs = {out.name for out in graph.output}
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if node.domain in ("", "ai.onnx") and node.op_type == "Constant":
            tensor = _const_to_initializer(node)
            if tensor is not None:
                graph.initializer.append(tensor)
                continue
        if (
            node.domain in ("", "ai.onnx")
            and node.op_type == "Identity"
            and node.output[0] not in graph_outputs
        ):
            rename[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    _drop_irrelevant_allowzero(graph)
    return model_copy


def _drop_irrelevant_allowzero(graph: onnx.GraphProto) -> None:
    """Reshape's allowzero only matters for a 0 in the shape; torch's exporter sets it anyway."""
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        if 0 in numpy_helper.to_array(initializers[node.input[1]]).tolist():
            continue
        for attr in list(node.attribute):
            if attr.name == "allowzero":
                node.attribute.remove(attr)


def opset_version(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_ops_supported(model: onnx.ModelProto, source: Any) -> None:
    """Raise ImportFailed naming the first node whose op has no converter."""
    versions = {o.domain: o.version for o in model.opset_import}
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        version = versions.get(node.domain, versions.get(domain, 0))
        try:
            registry.get_converter(node.op_type, version, domain)
        except NotImplementedError:
            where = f"domain '{domain}', " if domain else ""
            raise ImportFailed(
                f"{source}: unsupported ONNX op {node.op_type} ({where}opset {version}) "
                f"at node '{node.name or node.output[0]}'"
            ) from None


def onnx_to_torch(
    model: onnx.ModelProto, source: Any, input_shape: tuple[int, ...]
) -> torch.fx.GraphModule:
    """Convert a (prepared) ONNX model to a torch.fx GraphModule, with clear errors.

    Hard-coded reshape/split sizes are then made to follow the actual input (shape_agnostic.py),
    so the module runs at any batch size and survives channel pruning; constant pads and resize
    scales are made static (constant_args.py).
    """
    from onnx2torch import convert

    check_ops_supported(model, source)
    try:
        module = convert(model)
    except NotImplementedError as error:
        raise ImportFailed(f"{source}: cannot convert to PyTorch: {error}") from error
    static_pads(module, input_shape)
    static_resizes(module)
    fuse_decompositions(module, input_shape)
    make_shape_agnostic(module, input_shape)
    return module
