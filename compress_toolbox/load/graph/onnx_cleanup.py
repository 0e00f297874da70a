"""Make ONNX graphs from other producers (tf2onnx, Keras, hand-written) prunable.

onnx2torch converts each ONNX node on its own, so a graph that spells a layer in pieces gives
a PyTorch module that torch-pruning cannot shrink:

* BatchNorm left as per-channel ``Mul``/``Add`` with [1, C, 1, 1] constants after a conv, and
  explicit ``Pad`` nodes before one (tf2onnx after depthwise convs): the constants keep the
  teacher's width (``size of tensor a (16) must match ... (32)``). onnxruntime's basic graph
  optimisation folds both into the convs; we use it through its public API (a session that
  saves its optimised model) and keep its result only if it holds nothing but standard ONNX ops.
  It is run only on graphs that have something to fold, so other models import as before, and
  with its Conv+BatchNormalization fusion off: BatchNorm statistics feed the ``bn-prior`` method.
  A per-channel Mul/Add that follows no conv (BatchNorm after a residual Add, as in
  pre-activation ResNets) cannot be folded: it becomes a depthwise 1x1 conv, a layer
  torch-pruning shrinks with the channels it scales.
* Dense layers written as ``MatMul`` with a constant weight (+ ``Add``): onnx2torch makes a bare
  matmul with a constant, invisible as a layer. A 2-D ``MatMul`` becomes ``Gemm``, which
  onnx2torch turns into ``nn.Linear`` (onnxruntime already fuses MatMul+Add into Gemm; a MatMul
  without bias, or in a graph not optimised, is rewritten here).
* TensorFlow flattens features in H, W, C order (``Transpose(0, 2, 3, 1)`` then ``Reshape``)
  before its first Dense; torch-pruning maps a Dense's input columns in C, H, W order, so a
  student started from the teacher's weights would keep the wrong columns. The untransposed
  tensor is flattened instead (the target shape may be constant or computed, as tf2onnx writes
  it) and the Dense's weight rows permuted to C, H, W order: the same function.

The rewritten graph is never trusted by itself: the importer verifies the converted module
against the original file in onnxruntime.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress_toolbox.export.onnx_inspect import dim_size

_STANDARD_DOMAINS = ("", "ai.onnx")
# onnxruntime optimisers we turn off: folding BatchNormalization into the conv would lose the
# running statistics that the bn-prior method needs (and that torch-pruning shrinks fine).
_DISABLED_ORT_OPTIMIZERS = ("ConvBNFusion",)
_CHANNELS_LAST = [0, 2, 3, 1]


def clean_up(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with per-channel Mul/Add and Pad folded into convs (or, where
    no conv precedes them, as depthwise 1x1 convs), 2-D MatMul dense layers as Gemm, and H,W,C
    flattens before a dense layer turned into C,H,W."""
    if needs_folding(model):
        model = ort_basic_optimize(model) or model
    model = _copy(model)
    affine_to_depthwise_conv(model)
    matmul_to_gemm(model)
    channels_first_flatten(model)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    return result


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in graph.node for name in node.output}


def _drop_nodes(graph: onnx.GraphProto, dropped: set[int]) -> None:
    """Remove the nodes whose ``id`` is in ``dropped``, then the initializers no node reads
    (those also listed as graph inputs, as old exporters write them, stay)."""
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    used |= {out.name for out in graph.output} | {inp.name for inp in graph.input}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)


def _is_per_channel(tensor: onnx.TensorProto) -> bool:
    """A [1, C, 1, 1] or [C, 1, 1] constant (one value per channel of an NCHW tensor)."""
    dims = list(tensor.dims)
    return len(dims) in (3, 4) and all(d == 1 for d in dims[-2:]) and dims[:-3] in ([], [1])


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Names of the tensors that are initializers or computed from constants alone (Paddle2ONNX
    writes a conv's bias as ``Reshape(initializer, shape)`` added after the conv)."""
    constant = {init.name for init in graph.initializer}
    for node in graph.node:  # ONNX nodes are in topological order
        if all(name in constant for name in node.input if name):
            constant.update(node.output)
    return constant


def needs_folding(model: onnx.ModelProto) -> bool:
    """True when a conv is followed by a constant Mul/Add (per channel, or computed from
    constants) or preceded by a Pad, or a Pad's amounts are computed from constants (torch's
    exporter writes them so; constant_args.py makes only constant amounts static)."""
    graph = model.graph
    initializers = _initializers(graph)
    constants = _constant_tensors(graph)
    producers = _producers(graph)
    for node in graph.node:
        if node.op_type in ("Mul", "Add") and len(node.input) == 2:
            data, const = node.input
            if data in constants:
                data, const = const, data
            producer = producers.get(data)
            folds = const in constants and (const not in initializers
                                            or _is_per_channel(initializers[const]))  # fmt: skip
            if producer is not None and producer.op_type == "Conv" and folds:
                return True
        if node.op_type == "Conv" and getattr(producers.get(node.input[0]), "op_type", "") == "Pad":
            return True
        if node.op_type == "Pad" and len(node.input) > 1 and node.input[1] in constants:
            return node.input[1] not in initializers  # amounts computed: fold to constants
    return False


def ort_basic_optimize(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` after onnxruntime's basic graph optimisations, or None when onnxruntime cannot
    optimise it or its result holds a non-standard op (it would not convert to PyTorch)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="dafl-onnx-") as folder:
        target = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(target)
        options.log_severity_level = 3  # its warnings are about our copy, not the user's file
        try:
            ort.InferenceSession(
                model.SerializeToString(),
                options,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=list(_DISABLED_ORT_OPTIMIZERS),
            )
            optimized = onnx.load(str(target))
        except Exception:  # too large to serialise, or a model onnxruntime rejects: keep it
            return None
    if any(node.domain not in _STANDARD_DOMAINS for node in optimized.graph.node):
        return None
    # onnxruntime declares every domain it knows; keep only the ones the graph uses
    kept = [o for o in optimized.opset_import if o.domain in _STANDARD_DOMAINS]
    del optimized.opset_import[:]
    optimized.opset_import.extend(kept)
    return optimized


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes of the graph's tensors where ONNX shape inference knows them (None: unknown dim)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort: no shapes, no rewrite
        return {}
    shapes = {}
    graph = inferred.graph
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = [dim_size(d) for d in tensor_type.shape.dim]
    return shapes


def _channel_values(name: str, initializers: dict, channels: int) -> np.ndarray | None:
    """The ``channels`` values of a per-channel constant ``name``, else None."""
    if name not in initializers or not _is_per_channel(initializers[name]):
        return None
    values = numpy_helper.to_array(initializers[name])
    return values.reshape(-1) if values.size == channels else None


def _affine_of(
    node: onnx.NodeProto, initializers: dict, shapes: dict
) -> tuple[str, np.ndarray, int] | None:
    """(data input, per-channel constant, channels) of a Mul/Add on an NCHW tensor."""
    if node.op_type not in ("Mul", "Add") or len(node.input) != 2:
        return None
    data, const = node.input
    if data in initializers:
        data, const = const, data
    shape = shapes.get(data, [])
    if len(shape) != 4 or not shape[1]:
        return None
    values = _channel_values(const, initializers, shape[1])
    return None if values is None else (data, values, shape[1])


def affine_to_depthwise_conv(model: onnx.ModelProto) -> int:
    """Rewrite per-channel ``Mul`` (+ ``Add``), or ``Add`` alone, on an NCHW tensor as a
    depthwise 1x1 ``Conv`` in place; returns how many. Those on a graph input (input
    normalisation: its channels are never pruned) are left alone."""
    graph = model.graph
    if not any(node.op_type in ("Mul", "Add") for node in graph.node):
        return 0
    shapes = _shapes(model)
    initializers = _initializers(graph)
    users = _consumers(graph)
    outputs = {out.name for out in graph.output}
    inputs = {inp.name for inp in graph.input}
    dropped: set[int] = set()
    rewritten = 0
    for node in graph.node:
        found = _affine_of(node, initializers, shapes)
        if id(node) in dropped or found is None or found[0] in inputs:
            continue
        data, values, channels = found
        if node.op_type == "Mul":
            scale, shift = values, np.zeros_like(values)
        else:
            scale, shift = np.ones_like(values), values
        output = node.output[0]
        following = users.get(output, [])
        if node.op_type == "Mul" and len(following) == 1 and output not in outputs:
            bias = _affine_of(following[0], initializers, shapes)
            if following[0].op_type == "Add" and bias is not None and bias[0] == output:
                shift, output = bias[1], following[0].output[0]
                dropped.add(id(following[0]))
        weight, bias = f"{output}_depthwise_weight", f"{output}_depthwise_bias"
        graph.initializer.append(numpy_helper.from_array(scale.reshape(channels, 1, 1, 1), weight))
        graph.initializer.append(numpy_helper.from_array(shift, bias))
        conv = helper.make_node("Conv", [data, weight, bias], [output], name=node.name or output,
                                group=channels, kernel_shape=[1, 1])  # fmt: skip
        node.CopyFrom(conv)
        rewritten += 1
    if rewritten:
        _drop_nodes(graph, dropped)
    return rewritten


def _bias_of(
    node: onnx.NodeProto, users: dict, initializers: dict, width: int, outputs: set[str]
) -> tuple[onnx.NodeProto, np.ndarray] | None:
    """The Add that adds a constant (width,) or (1, width) bias to ``node``'s only output."""
    following = users.get(node.output[0], [])
    if len(following) != 1 or node.output[0] in outputs or following[0].op_type != "Add":
        return None
    add = following[0]
    other = [name for name in add.input if name != node.output[0]]
    if len(other) != 1 or other[0] not in initializers:
        return None
    bias = numpy_helper.to_array(initializers[other[0]])
    if bias.size != width or bias.shape not in ((width,), (1, width)):
        return None
    return add, bias.reshape(width)


def matmul_to_gemm(model: onnx.ModelProto) -> int:
    """Rewrite ``MatMul(x, W)`` (+ ``Add(b)``) with a 2-D ``x`` and constant 2-D ``W`` as
    ``Gemm(x, W, b)`` in place, which onnx2torch converts to ``nn.Linear``; returns how many."""
    graph = model.graph
    initializers = _initializers(graph)
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.domain in _STANDARD_DOMAINS]
    if not matmuls:
        return 0
    shapes = _shapes(model)
    users = _consumers(graph)
    outputs = {out.name for out in graph.output}
    opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 0)
    dropped: set[int] = set()
    rewritten = 0
    for node in matmuls:
        data, weight = node.input
        if weight not in initializers or len(initializers[weight].dims) != 2:
            continue
        if len(shapes.get(data, [])) != 2:
            continue  # Gemm takes 2-D inputs only (a MatMul over tokens stays as it is)
        width = initializers[weight].dims[1]
        inputs, output = [data, weight], node.output[0]
        bias = _bias_of(node, users, initializers, width, outputs)
        if bias is None and opset < 11:
            continue  # Gemm's bias became optional at opset 11
        if bias is not None:
            add, values = bias
            name = f"{weight}_gemm_bias"
            graph.initializer.append(numpy_helper.from_array(values, name))
            inputs.append(name)
            output = add.output[0]
            dropped.add(id(add))
        gemm = helper.make_node("Gemm", inputs, [output], name=node.name or output)
        node.CopyFrom(gemm)
        rewritten += 1
    if rewritten:
        _drop_nodes(graph, dropped)
    return rewritten


def _dense_after_flatten(
    flatten: onnx.NodeProto, users: dict, initializers: dict, outputs: set[str]
) -> onnx.NodeProto | None:
    """The Gemm with a constant weight that alone reads ``flatten``'s output (a Reshape, however
    its shape is computed, or a Flatten at axis 1). Gemm takes 2-D inputs only, so with the
    weight's row count equal to the features per sample, the reshape is the N x (H*W*C) one."""
    if flatten.op_type == "Flatten" and _attribute(flatten, "axis", 1) != 1:
        return None
    if flatten.op_type not in ("Reshape", "Flatten"):
        return None
    dense = users.get(flatten.output[0], [])
    if len(dense) != 1 or flatten.output[0] in outputs or dense[0].op_type != "Gemm":
        return None
    gemm = dense[0]
    if gemm.input[0] != flatten.output[0] or gemm.input[1] not in initializers:
        return None
    return None if _attribute(gemm, "transA", 0) else gemm


def _attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _permute_rows(gemm: onnx.NodeProto, graph: onnx.GraphProto, initializers: dict,
                  chw: tuple[int, int, int]) -> bool:  # fmt: skip
    """Give ``gemm`` a copy of its weight whose H,W,C-ordered input rows are in C,H,W order."""
    channels, height, width = chw
    weight = numpy_helper.to_array(initializers[gemm.input[1]])
    transposed = bool(_attribute(gemm, "transB", 0))  # weight (out, K) instead of (K, out)
    if weight.ndim != 2 or weight.shape[1 if transposed else 0] != channels * height * width:
        return False
    if transposed:
        permuted = weight.reshape(-1, height, width, channels).transpose(0, 3, 1, 2)
    else:
        permuted = weight.reshape(height, width, channels, -1).transpose(2, 0, 1, 3)
    name = f"{gemm.input[1]}_channels_first"
    graph.initializer.append(numpy_helper.from_array(permuted.reshape(weight.shape), name))
    gemm.input[1] = name
    return True


def channels_first_flatten(model: onnx.ModelProto) -> int:
    """Flatten the tensor before ``Transpose(0, 2, 3, 1)`` instead of the transposed one where
    the flatten feeds a dense layer, permuting the dense weight's rows from H,W,C to C,H,W
    order, in place; the transpose goes once nothing else reads it. Returns how many."""
    graph = model.graph
    transposes = [n for n in graph.node if n.op_type == "Transpose"
                  and list(_attribute(n, "perm", [])) == _CHANNELS_LAST]  # fmt: skip
    if not transposes:
        return 0
    shapes = _shapes(model)
    initializers = _initializers(graph)
    users = _consumers(graph)
    outputs = {out.name for out in graph.output}
    rewritten = 0
    for transpose in transposes:
        shape = shapes.get(transpose.input[0], [])
        if len(shape) != 4 or None in shape[1:]:
            continue  # sizes unknown: graph_facts.channels_last_flatten refuses teacher init
        for flatten in users.get(transpose.output[0], []):
            gemm = _dense_after_flatten(flatten, users, initializers, outputs)
            if gemm is not None and _permute_rows(gemm, graph, initializers, tuple(shape[1:])):
                flatten.input[0] = transpose.input[0]
                rewritten += 1
    if rewritten:
        used = {name for node in graph.node for name in node.input} | outputs
        _drop_nodes(graph, {id(t) for t in transposes if t.output[0] not in used})
    return rewritten
