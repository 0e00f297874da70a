"""TensorFlow -> ONNX conversion, run as a separate process by importers/tensorflow.py.

Importing TensorFlow and torch in one process segfaults, so this file imports neither torch nor
compress_toolbox: the parent runs it by path (``runpy``) with

    --kind KIND --source PATH --out DIR [--shape H,W,C] [--model-class SPEC]
    [--model-kwargs JSON] [--trust-code]

and it writes into DIR: ``model.onnx`` (tf2onnx, opset 17, input as NCHW), ``reference.npz``
(TensorFlow's own outputs ``y<i>_<k>`` for the fixed NHWC inputs ``x<i>``, output k in the ONNX
outputs' order) and ``result.json`` (input name, NHWC shape, ONNX output names, notes). A problem
the user can fix is written as one line to ``error.txt`` (exit 2); anything else as the
exception's first line (exit 1).

Unless --trust-code is given, every graph is checked by ``tf_graph_safety.py`` before TensorFlow
loads it: an op that could touch files, processes or the network is refused (exit 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _load_sibling(name: str):
    """A module beside this file, loaded by path: importing compress_toolbox would import torch."""
    spec = importlib.util.spec_from_file_location(f"_dafl_{name}", Path(__file__).with_name(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAFETY = _load_sibling("tf_graph_safety.py")

OPSET = 17
INPUT_NAME = "input"  # the placeholder name of the functions we trace (Keras, SavedModel, TF2)
# Ops that end a graph without computing a model output (variables, savers, initialisers).
NOT_OUTPUTS = {
    "NoOp", "Assert", "Const", "Placeholder", "PlaceholderWithDefault", "VariableV2",
    "VarHandleOp", "Assign", "AssignVariableOp", "SaveV2", "RestoreV2", "MergeV2Checkpoints",
    "ShardedFilename", "StringJoin", "IsVariableInitialized",
}  # fmt: skip
VARIABLE_OPS = {"Variable", "VariableV2", "VarHandleOp"}


class UserError(Exception):
    """A problem with the user's file or options, said in one line."""


@dataclass
class Route:
    """How one format is read: its input size, its conversion, and TensorFlow running it."""

    shape: tuple[int, ...]  # H, W, C
    convert: Callable[[], onnx.ModelProto]
    run: Callable[[np.ndarray], list[np.ndarray]]  # NHWC batch -> outputs, in ONNX order
    notes: list[str] = field(default_factory=list)


def _tf():
    import tensorflow as tf

    return tf


def _spec(shape: tuple[int | None, ...]):
    """A float32 NHWC TensorSpec with a free batch, named INPUT_NAME."""
    tf = _tf()
    return tf.TensorSpec((None, *shape), tf.float32, name=INPUT_NAME)


def _nhwc(static: list, given: tuple[int, ...] | None, what: str) -> tuple[int, ...]:
    """H, W, C from a 4-D static shape, ``given`` (from --input-shape) winning."""
    if len(static) != 4:
        raise UserError(f"{what} has shape {static}; dafl-compress reads image models (N,H,W,C)")
    if given:
        return tuple(given)
    if any(dim is None or dim < 0 for dim in static[1:]):
        raise UserError(f"{what} has no fixed size ({static}); give it with --input-shape C,H,W")
    return tuple(int(dim) for dim in static[1:])


def _traced(function, shape, outputs_of):
    """Convert a traced tf.function; TensorFlow runs the same function for the reference."""
    import tf2onnx

    spec = _spec(shape)
    traced = _tf().function(function, input_signature=[spec], autograph=False)
    concrete = traced.get_concrete_function(spec)
    input_name = concrete.inputs[0].name  # "input:0": what inputs_as_nchw must name

    def convert():
        return tf2onnx.convert.from_function(
            traced, input_signature=[spec], opset=OPSET, inputs_as_nchw=[input_name]
        )[0]

    def run(x):
        return outputs_of(traced(x))

    return convert, run


def _flat_numpy(result) -> list:
    # tf2onnx orders a function's outputs as tf.nest.flatten does (dict keys sorted)
    return [value.numpy() for value in _tf().nest.flatten(result)]


def _keras_model(model, given, what: str):
    if len(model.inputs) != 1:
        raise UserError(f"{what} has {len(model.inputs)} inputs; one is supported")
    shape = _nhwc(list(model.inputs[0].shape), given, f"{what}'s input")
    return Route(shape, *_traced(lambda x: model(x, training=False), shape, _flat_numpy))


def route_keras(source: Path, args):
    """``.keras`` / ``.h5``: keras.saving.load_model with safe_mode unless --trust-pickle."""
    import zipfile

    import keras

    if source.suffix.lower() == ".keras" and not zipfile.is_zipfile(source):
        # Keras itself answers "File not found" for a damaged .keras archive
        raise UserError("not a readable .keras file (it is a zip archive: truncated or corrupt?)")
    try:
        model = keras.saving.load_model(source, compile=False, safe_mode=not args.trust_code)
    except ValueError as error:
        if "safe_mode" in str(error) or "unsafe" in str(error).lower():
            raise UserError(
                "the Keras file holds Python code (a Lambda layer?), which runs when loaded; "
                "pass --trust-pickle if you trust the file"
            ) from None
        raise UserError(f"Keras cannot load it: {_first_line(error)}") from None
    except OSError as error:  # h5py on a damaged .h5
        raise UserError(f"cannot read it (truncated or corrupt?): {_first_line(error)}") from None
    return _keras_model(model, args.shape, "the Keras model")


def _read_saved_model(source: Path):
    """The SavedModel proto, read as TensorFlow's loader reads it (saved_model.pb, else .pbtxt)."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf.saved_model_pb2 import SavedModel

    proto = SavedModel()
    try:
        if (source / "saved_model.pb").is_file():
            proto.ParseFromString((source / "saved_model.pb").read_bytes())
        else:
            text_format.Parse((source / "saved_model.pbtxt").read_text(), proto)
    except Exception as error:  # e.g. "Error parsing message"
        raise UserError(f"cannot read the SavedModel (truncated or corrupt?): "
                        f"{_first_line(error)}") from None  # fmt: skip
    return proto


def route_savedmodel(source: Path, args):
    """A SavedModel folder, its graphs checked first: a TF2 one through its ``serving_default``
    signature; a TF1 one read like a TF1 checkpoint (TensorFlow's loader would run its restore
    and init ops, which are graph ops from the file)."""
    proto = _read_saved_model(source)
    if not args.trust_code:
        SAFETY.check_saved_model(proto)
    metas = proto.meta_graphs
    if len(metas) == 1 and metas[0].HasField("object_graph_def"):  # as tf.saved_model.load decides
        return _route_tf2_savedmodel(source, args)
    return _route_tf1_savedmodel(source, metas, args)


def _route_tf2_savedmodel(source: Path, args):
    tf = _tf()
    try:
        loaded = tf.saved_model.load(str(source))
    except (OSError, ValueError) as error:  # e.g. "Wire format was corrupt"
        raise UserError(f"cannot read the SavedModel (truncated or corrupt?): "
                        f"{_first_line(error)}") from None  # fmt: skip
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        names = ", ".join(loaded.signatures) or "none"
        raise UserError(f"the SavedModel has no serving_default signature (it has: {names})")
    specs = signature.structured_input_signature[1]
    if len(specs) != 1:
        raise UserError(f"serving_default takes {len(specs)} inputs ({', '.join(specs)})")
    key, spec = next(iter(specs.items()))
    shape = _nhwc(spec.shape.as_list(), args.shape, f"serving_default input '{key}'")

    def serve(x):  # through `loaded`: the signature alone does not keep its variables alive
        return loaded.signatures["serving_default"](**{key: x})

    return Route(shape, *_traced(serve, shape, _flat_numpy))


def _route_tf1_savedmodel(source: Path, metas, args):
    """A TF1 SavedModel: the serving meta graph's ``serving_default`` tensors, its variables
    read from variables/variables."""
    serving = [meta for meta in metas if "serve" in meta.meta_info_def.tags] or list(metas)
    if len(serving) != 1:
        raise UserError(f"the SavedModel has {len(serving)} meta graphs and none tagged 'serve'")
    meta = serving[0]
    signature = meta.signature_def.get("serving_default")
    if signature is None:
        names = ", ".join(meta.signature_def) or "none"
        raise UserError(f"the SavedModel has no serving_default signature (it has: {names})")
    if len(signature.inputs) != 1:
        raise UserError(f"serving_default takes {len(signature.inputs)} inputs "
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
        raise UserError(
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
        raise UserError(f"{what}: nothing is computed from the input '{placeholders[0]}'")
    return f"{placeholders[0]}:0", [f"{name}:0" for name in sorted(sinks)]


def _from_graph_def(graph_def, args, what: str, io: tuple[str, list[str]] | None = None):
    """Convert a frozen GraphDef; a TF1 session runs it for the reference. ``io``: the input
    and output tensor names, if not found from the graph's one placeholder."""
    import tf2onnx

    tf = _tf()
    input_name, output_names = io or _graph_io(graph_def, what)
    with tf.Graph().as_default() as graph:
        tf.import_graph_def(graph_def, name="")
        static = graph.get_tensor_by_name(input_name).shape
    static = static.as_list() if static.rank is not None else [None] * 4
    shape = _nhwc(static, args.shape, f"{what}'s input '{input_name}'")
    session = tf.compat.v1.Session(graph=graph)

    def convert():
        return tf2onnx.convert.from_graph_def(
            graph_def, input_names=[input_name], output_names=output_names,
            opset=OPSET, inputs_as_nchw=[input_name],
        )[0]  # fmt: skip

    def run(x):
        return session.run(output_names, {input_name: x})

    return Route(shape, convert, run)


def route_frozen(source: Path, args):
    """A frozen ``.pb`` GraphDef: input from its placeholder, outputs from its sinks."""
    graph_def = _tf().compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(source.read_bytes())
    except Exception as error:
        raise UserError(f"not a frozen TensorFlow graph ({_first_line(error)})") from None
    if not graph_def.node:
        raise UserError("not a frozen TensorFlow graph (no nodes)")
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
            raise UserError(f"cannot read the TF1 checkpoint's graph: "
                            f"{_first_line(error)}") from None  # fmt: skip
    if not args.trust_code:
        SAFETY.check_graph(meta.graph_def, "the checkpoint's graph", runs_all=False)
    return _route_tf1_graph(meta, source.with_suffix(""), args, "the checkpoint's graph")


def _route_tf1_graph(meta, prefix: Path, args, what: str, io=None):
    """The part of a TF1 graph that computes the outputs, its variables replaced by their values
    in the checkpoint at ``prefix``. The file's restore op is never run: a saver's restore op is
    a graph op like any other, and a crafted file can make it anything."""
    tf = _tf()
    input_name, output_names = io or _graph_io(meta.graph_def, what)
    try:
        needed = tf.compat.v1.graph_util.extract_sub_graph(
            meta.graph_def, [name.split(":")[0] for name in output_names]
        )
    except (AssertionError, TypeError, ValueError) as error:  # an output not in the graph
        raise UserError(f"{what}: {_first_line(error)}") from None
    if not args.trust_code:
        SAFETY.check_graph(needed, what)  # all that runs: no saver op in it
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except Exception as error:
        raise UserError(f"cannot read the checkpoint {prefix.name}: {_first_line(error)}") from None
    frozen = _freeze(needed, reader, _checkpoint_keys(meta.graph_def), what)
    return _from_graph_def(frozen, args, what, (input_name, output_names))


def _checkpoint_keys(graph_def) -> dict[str, str]:
    """{variable: its key in the checkpoint}, read (not run) from the saver's restore subgraph,
    ``Assign(variable, RestoreV2:i)``: a Saver given a dict stores variables under other names."""
    tf = _tf()
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
    tf = _tf()
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
            raise UserError(f"{what}: variable '{variable}' is used by {node.op} node "
                            f"'{node.name}', which dafl-compress cannot freeze")  # fmt: skip
        node.op = "Identity"
        node.attr["T"].type = node.attr["dtype"].type
        del node.attr["dtype"]
    return frozen


def _checkpoint_value(reader, key: str, node, dtype, what: str):
    if not reader.has_tensor(key):
        raise UserError(f"{what}: the checkpoint has no value for variable '{node.name}'")
    value = reader.get_tensor(key)
    shape = _tf().TensorShape(node.attr["shape"].shape if "shape" in node.attr else None)
    if value.dtype != dtype.as_numpy_dtype or not shape.is_compatible_with(value.shape):
        raise UserError(
            f"{what}: variable '{node.name}' is {dtype.name} {shape} in the graph, "
            f"{value.dtype} {list(value.shape)} in the checkpoint"
        )
    return value


def route_tf2(source: Path, args):
    """A TF2 object checkpoint (.index + .data): the user's build function, restored strictly."""
    tf = _tf()
    model = _build_user_model(args.model_class, json.loads(args.model_kwargs or "{}"))
    prefix = str(source.with_suffix(""))
    roots = {name.split("/")[0] for name, _ in tf.train.list_variables(prefix)}
    if "_CHECKPOINTABLE_OBJECT_GRAPH" not in roots:
        raise UserError("a name-based (TF1) checkpoint: give its .meta graph file instead")
    roots -= {"_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"}
    root = "model" if "model" in roots else (next(iter(roots)) if len(roots) == 1 else None)
    if root is None:
        raise UserError(f"the checkpoint holds {', '.join(sorted(roots))}: which is the model?")
    route = _keras_model(model, args.shape, f"--model-class {args.model_class}")
    model(_tf().zeros((1, *route.shape)))  # create the variables before restoring into them
    try:  # a wrong shape fails in read() (ValueError), a missing value in the assertion
        status = tf.train.Checkpoint(**{root: model}).read(prefix)
        if roots == {root}:
            status.assert_consumed()  # every value in the file restored into the model
        else:  # an optimizer's state beside the model stays unread: every model value must load
            status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:
        raise UserError(
            f"the checkpoint does not match --model-class {args.model_class}: "
            f"{_first_line(error)[:300]}"
        ) from None
    return route


def _build_user_model(spec: str, kwargs: dict):
    """Run ``build_fn(**kwargs)`` from ``file.py:build_fn`` (as --model-class does for torch)."""
    location, _, name = spec.rpartition(":")
    if not location.endswith(".py") or not name:
        raise UserError(f"--model-class {spec!r}: expected file.py:build_fn for a TF checkpoint")
    file = Path(location)
    if not file.is_file():
        raise UserError(f"--model-class: no such file {file}")
    module_spec = importlib.util.spec_from_file_location(f"_dafl_user_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.parent))  # its own modules beside it, as `python file.py` has
    try:
        module_spec.loader.exec_module(module)
        return getattr(module, name)(**kwargs)
    except Exception as error:
        raise UserError(f"--model-class {spec}: cannot build the model: {error}") from None
    finally:
        sys.path.remove(str(file.parent))


def _tflite_quantisation(source: Path) -> str:
    """'float', 'int8' (activations quantised too) or 'dynamic' (int8 weights, float math)."""
    try:
        return _read_tflite_quantisation(source.read_bytes())
    except Exception as error:  # a damaged flatbuffer fails anywhere while it is read
        raise UserError(f"not a readable TFLite file (truncated or corrupt?): "
                        f"{_first_line(error)}") from None  # fmt: skip


def _read_tflite_quantisation(data: bytes) -> str:
    from tf2onnx.tflite.Model import Model
    from tf2onnx.tflite.TensorType import TensorType

    model = Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    integer = (TensorType.INT8, TensorType.UINT8)

    def constant(tensor) -> bool:
        return model.Buffers(tensor.Buffer()).DataLength() > 0

    tensors = [graph.Tensors(i) for i in range(graph.TensorsLength())]
    if any(t.Type() in integer and not constant(t) for t in tensors):
        return "int8"
    for i in range(graph.OperatorsLength()):
        inputs = [graph.Tensors(j) for j in graph.Operators(i).InputsAsNumpy() if j >= 0]
        if any(t.Type() in integer and constant(t) for t in inputs):
            return "dynamic"
    return "float"


def route_tflite(source: Path, args):
    """TFLite: float as is; full-int8 dequantised (tf2onnx --dequantize); refuse dynamic-range."""
    import tf2onnx

    tf = _tf()
    quantisation = _tflite_quantisation(source)
    if not args.trust_code:
        SAFETY.check_tflite(source.read_bytes())
    if quantisation == "dynamic":
        raise UserError(
            "a dynamic-range quantised TFLite model (int8 weights, float arithmetic) cannot be "
            "converted faithfully: give the float model (.tflite before quantisation, "
            "SavedModel or .keras)"
        )
    interpreter = tf.lite.Interpreter(model_path=str(source))
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1:
        raise UserError(f"the TFLite model has {len(inputs)} inputs; one is supported")
    if inputs[0]["dtype"] != tf.float32.as_numpy_dtype:
        raise UserError(
            f"the TFLite model takes {inputs[0]['dtype'].__name__} inputs: convert it with "
            "float input and output (inference_input_type=tf.float32)"
        )
    name = inputs[0]["name"]
    shape = _nhwc(list(inputs[0]["shape_signature"]), args.shape, f"TFLite input '{name}'")

    def convert():
        if quantisation == "float":
            return tf2onnx.convert.from_tflite(str(source), opset=OPSET, inputs_as_nchw=[name])[0]
        # from_tflite has no dequantize option: tf2onnx's command line does
        out = Path(args.out) / "dequantised.onnx"
        command = [sys.executable, "-m", "tf2onnx.convert", "--tflite", str(source),
                   "--dequantize", "--opset", str(OPSET), "--inputs-as-nchw", name,
                   "--output", str(out)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            tail = done.stderr.strip().splitlines()[-1:] or ["no message"]
            raise UserError(f"tf2onnx --dequantize failed: {tail[0]}")
        return onnx.load(str(out))

    def run(x):  # the interpreter at batch 1, sample by sample
        interpreter.resize_tensor_input(inputs[0]["index"], [1, *shape])
        interpreter.allocate_tensors()
        results = []
        for sample in x:
            interpreter.set_tensor(inputs[0]["index"], sample[None])
            interpreter.invoke()
            results.append([interpreter.get_tensor(o["index"]) for o in outputs])
        return [np.concatenate([r[k] for r in results]) for k in range(len(outputs))]

    return Route(shape, convert, run, notes=[f"tflite-{quantisation}"])


ROUTES = {
    "keras": route_keras,
    "savedmodel": route_savedmodel,
    "frozen": route_frozen,
    "tf1": route_tf1,
    "tf2": route_tf2,
    "tflite": route_tflite,
}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def convert(args) -> None:
    """Run the route, write the ONNX file, TensorFlow's reference outputs and result.json."""
    out = Path(args.out)
    route = ROUTES[args.kind](Path(args.source), args)
    model = route.convert()
    onnx.save(model, str(out / "model.onnx"))
    rng = np.random.default_rng(0)
    arrays = {}
    for i, batch in enumerate(args.batches):  # the importer's verification batches
        x = rng.standard_normal((batch, *route.shape)).astype(np.float32)
        arrays[f"x{i}"] = x
        for k, y in enumerate(route.run(x)):
            arrays[f"y{i}_{k}"] = np.asarray(y, dtype=np.float32)
    np.savez(out / "reference.npz", **arrays)
    result = {
        "input": model.graph.input[0].name,
        "nhwc": list(route.shape),
        "outputs": [output.name for output in model.graph.output],
        "notes": route.notes,
    }
    (out / "result.json").write_text(json.dumps(result))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="_tf_convert")
    parser.add_argument("--kind", choices=ROUTES, required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", type=lambda s: tuple(int(d) for d in s.split(",")))
    parser.add_argument("--model-class")
    parser.add_argument("--model-kwargs")
    parser.add_argument("--trust-code", action="store_true")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 3])
    args = parser.parse_args(argv)
    try:
        convert(args)
    except (UserError, SAFETY.UnsafeGraph) as error:
        (Path(args.out) / "error.txt").write_text(str(error))
        return 2
    except Exception as error:  # tf2onnx or TensorFlow failed: the first line says why
        (Path(args.out) / "error.txt").write_text(f"{type(error).__name__}: {_first_line(error)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
