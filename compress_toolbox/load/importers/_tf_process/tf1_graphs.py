"""TF1 graphs: frozen ``.pb``, ``.meta`` checkpoints and TF1 SavedModels. The part of the graph
that computes the outputs is found, checked and frozen with the checkpoint's values read by
name; the file's own restore op never runs."""

from __future__ import annotations

from pathlib import Path

import tf_common as common
import tf_graph_safety as SAFETY

# Ops that end a graph without computing a model output (variables, savers, initialisers).
NOT_OUTPUTS = {
    "NoOp", "Assert", "Const", "Placeholder", "PlaceholderWithDefault", "VariableV2",
    "VarHandleOp", "Assign", "AssignVariableOp", "SaveV2", "RestoreV2", "MergeV2Checkpoints",
    "ShardedFilename", "StringJoin", "IsVariableInitialized",
}  # fmt: skip
VARIABLE_OPS = {"Variable", "VariableV2", "VarHandleOp"}


def route_tf1_savedmodel(source: Path, metas, args):
    """A TF1 SavedModel: the serving meta graph's ``serving_default`` tensors, its variables
    read from variables/variables."""
    serving = [meta for meta in metas if "serve" in meta.meta_info_def.tags] or list(metas)
    if len(serving) != 1:
        raise common.UserError(
            f"the SavedModel has {len(serving)} meta graphs and none tagged 'serve'"
        )
    meta = serving[0]
    signature = meta.signature_def.get("serving_default")
    if signature is None:
        names = ", ".join(meta.signature_def) or "none"
        raise common.UserError(f"the SavedModel has no serving_default signature (it has: {names})")
    if len(signature.inputs) != 1:
        raise common.UserError(f"serving_default takes {len(signature.inputs)} inputs "
                        f"({', '.join(signature.inputs)})")  # fmt: skip
    input_name = next(iter(signature.inputs.values())).name
    outputs = [signature.outputs[key].name for key in sorted(signature.outputs)]
    prefix = source / "variables" / "variables"
    return _route_tf1_graph(meta, prefix, args, "the SavedModel's graph", (input_name, outputs))


def _graph_io(graph_def, what: str) -> tuple[str, list[str]]:
    """The one placeholder, and the sinks computed from it (ops nobody else consumes)."""
    nodes = {node.name: node for node in graph_def.node}
    placeholders = [node.name for node in graph_def.node if node.op == "Placeholder"]
    if len(placeholders) != 1:
        listed = ", ".join(placeholders[:6]) or "none"
        raise common.UserError(
            f"{what} has {len(placeholders)} placeholders ({listed}); dafl-compress needs "
            "exactly one input: save the inference graph only"
        )
    consumers: dict[str, set[str]] = {name: set() for name in nodes}
    for node in graph_def.node:
        for inp in node.input:
            producer = inp.lstrip("^").split(":")[0]
            if producer in consumers:
                consumers[producer].add(node.name)
    reached, frontier = set(), [placeholders[0]]
    while frontier:  # everything computed from the input
        for consumer in consumers[frontier.pop()] - reached:
            reached.add(consumer)
            frontier.append(consumer)
    sinks = [
        name for name in nodes
        if name in reached and not consumers[name] & reached
        and nodes[name].op not in NOT_OUTPUTS
    ]  # fmt: skip
    if not sinks:
        raise common.UserError(f"{what}: nothing is computed from the input '{placeholders[0]}'")
    return f"{placeholders[0]}:0", [f"{name}:0" for name in sorted(sinks)]


def _from_graph_def(graph_def, args, what: str, io: tuple[str, list[str]] | None = None):
    """Convert a frozen GraphDef; a TF1 session runs it for the reference. ``io``: the input
    and output tensor names, if not found from the graph's one placeholder."""
    import tf2onnx

    tf = common.load_tf()
    input_name, output_names = io or _graph_io(graph_def, what)
    with tf.Graph().as_default() as graph:
        tf.import_graph_def(graph_def, name="")
        static = graph.get_tensor_by_name(input_name).shape
    static = static.as_list() if static.rank is not None else [None] * 4
    shape = common.nhwc(static, args.shape, f"{what}'s input '{input_name}'")
    session = tf.compat.v1.Session(graph=graph)

    def convert():
        return tf2onnx.convert.from_graph_def(
            graph_def, input_names=[input_name], output_names=output_names,
            opset=common.OPSET, inputs_as_nchw=[input_name],
        )[0]  # fmt: skip

    def run(x):
        return session.run(output_names, {input_name: x})

    return common.Route(shape, convert, run)


def route_frozen(source: Path, args):
    """A frozen ``.pb`` GraphDef: input from its placeholder, outputs from its sinks."""
    graph_def = common.load_tf().compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(source.read_bytes())
    except Exception as error:
        raise common.UserError(
            f"not a frozen TensorFlow graph ({common.first_line(error)})"
        ) from None
    if not graph_def.node:
        raise common.UserError("not a frozen TensorFlow graph (no nodes)")
    if not args.trust_code:
        SAFETY.check_graph(graph_def, "the graph")
    return _from_graph_def(graph_def, args, "the graph")


def route_tf1(source: Path, args):
    """A TF1 checkpoint: the ``.meta`` graph, checked, its variables read and frozen."""
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf.meta_graph_pb2 import MetaGraphDef

    meta = MetaGraphDef()
    data = source.read_bytes()
    try:
        meta.ParseFromString(data)
    except message.DecodeError:  # import_meta_graph reads the text format too
        try:
            text_format.Merge(data.decode(errors="replace"), meta)
        except text_format.ParseError as error:
            raise common.UserError(f"cannot read the TF1 checkpoint's graph: "
                            f"{common.first_line(error)}") from None  # fmt: skip
    if not args.trust_code:
        SAFETY.check_graph(meta.graph_def, "the checkpoint's graph", runs_all=False)
    return _route_tf1_graph(meta, source.with_suffix(""), args, "the checkpoint's graph")


def _route_tf1_graph(meta, prefix: Path, args, what: str, io=None):
    """The part of a TF1 graph that computes the outputs, its variables replaced by their values
    in the checkpoint at ``prefix``. The file's restore op is never run: a saver's restore op is
    a graph op like any other, and a crafted file can make it anything."""
    tf = common.load_tf()
    input_name, output_names = io or _graph_io(meta.graph_def, what)
    try:
        needed = tf.compat.v1.graph_util.extract_sub_graph(
            meta.graph_def, [name.split(":")[0] for name in output_names]
        )
    except (AssertionError, TypeError, ValueError) as error:  # an output not in the graph
        raise common.UserError(f"{what}: {common.first_line(error)}") from None
    if not args.trust_code:
        SAFETY.check_graph(needed, what)  # all that runs: no saver op in it
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except Exception as error:
        raise common.UserError(
            f"cannot read the checkpoint {prefix.name}: {common.first_line(error)}"
        ) from None
    frozen = _freeze(needed, reader, _checkpoint_keys(meta.graph_def), what)
    return _from_graph_def(frozen, args, what, (input_name, output_names))


def _checkpoint_keys(graph_def) -> dict[str, str]:
    """{variable: its key in the checkpoint}, read (not run) from the saver's restore subgraph,
    ``Assign(variable, RestoreV2:i)``: a Saver given a dict stores variables under other names."""
    tf = common.load_tf()
    nodes = {node.name: node for node in graph_def.node}
    keys = {}
    for node in graph_def.node:
        if node.op not in ("Assign", "AssignVariableOp") or len(node.input) < 2:
            continue
        source = node.input[1]
        for _ in range(8):  # through the saver's Identity nodes
            producer = nodes.get(source.split(":")[0])
            if producer is None or producer.op != "Identity" or not producer.input:
                break
            source = producer.input[0]
        restore, _, index = source.partition(":")
        restore, index = nodes.get(restore), int(index) if index.isdigit() else 0
        if restore is None or restore.op != "RestoreV2" or len(restore.input) < 2:
            continue
        names = nodes.get(restore.input[1].split(":")[0])
        if names is not None and names.op == "Const":
            values = tf.make_ndarray(names.attr["value"].tensor).reshape(-1)
            if index < len(values):
                keys[node.input[0].split(":")[0]] = values[index].decode()
    return keys


def _freeze(graph_def, reader, keys: dict[str, str], what: str):
    """``graph_def`` with each variable a Const of its checkpoint value and each read of a
    resource variable an Identity: what convert_variables_to_constants makes, without a session."""
    tf = common.load_tf()
    frozen = type(graph_def)()
    frozen.CopyFrom(graph_def)
    resources = {}
    for node in frozen.node:
        node.device = ""
        if node.op not in VARIABLE_OPS:
            continue
        dtype = tf.as_dtype(node.attr["dtype"].type)
        value = _checkpoint_value(reader, keys.get(node.name, node.name), node, dtype, what)
        if node.op == "VarHandleOp":
            resources[node.name] = dtype
        node.op = "Const"
        del node.input[:]
        node.attr.clear()
        node.attr["dtype"].type = dtype.as_datatype_enum
        node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
    for node in frozen.node:
        variable = next((i.split(":")[0] for i in node.input if i.split(":")[0] in resources), None)
        if variable is None:
            continue
        if node.op != "ReadVariableOp":
            raise common.UserError(f"{what}: variable '{variable}' is used by {node.op} node "
                            f"'{node.name}', which dafl-compress cannot freeze")  # fmt: skip
        node.op = "Identity"
        node.attr["T"].type = node.attr["dtype"].type
        del node.attr["dtype"]
    return frozen


def _checkpoint_value(reader, key: str, node, dtype, what: str):
    if not reader.has_tensor(key):
        raise common.UserError(f"{what}: the checkpoint has no value for variable '{node.name}'")
    value = reader.get_tensor(key)
    shape = common.load_tf().TensorShape(node.attr["shape"].shape if "shape" in node.attr else None)
    if value.dtype != dtype.as_numpy_dtype or not shape.is_compatible_with(value.shape):
        raise common.UserError(
            f"{what}: variable '{node.name}' is {dtype.name} {shape} in the graph, "
            f"{value.dtype} {list(value.shape)} in the checkpoint"
        )
    return value
