"""TensorFlow -> ONNX conversion, run as a separate process by importers/tensorflow.py.

Importing TensorFlow and torch in one process segfaults, so this folder imports neither torch nor
compress_toolbox: the parent runs this file by path (``runpy``) with

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
import sys
from pathlib import Path

import numpy as np
import onnx

# This folder's modules by name: it holds only the converter's, so nothing installed is shadowed
# (the importers/ folder itself would shadow the real ``tensorflow``).
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tf1_graphs  # noqa: E402
import tf_common as common  # noqa: E402
import tf_graph_safety as SAFETY  # noqa: E402
import tflite_route  # noqa: E402


def _keras_model(model, given, what: str):
    if len(model.inputs) != 1:
        raise common.UserError(f"{what} has {len(model.inputs)} inputs; one is supported")
    shape = common.nhwc(list(model.inputs[0].shape), given, f"{what}'s input")
    return common.Route(
        shape, *common.traced_function(lambda x: model(x, training=False), shape, common.flat_numpy)
    )


def route_keras(source: Path, args):
    """``.keras`` / ``.h5``: keras.saving.load_model with safe_mode unless --trust-pickle."""
    import zipfile

    import keras

    if source.suffix.lower() == ".keras" and not zipfile.is_zipfile(source):
        # Keras itself answers "File not found" for a damaged .keras archive
        raise common.UserError(
            "not a readable .keras file (it is a zip archive: truncated or corrupt?)"
        )
    try:
        model = keras.saving.load_model(source, compile=False, safe_mode=not args.trust_code)
    except ValueError as error:
        missing = common.keras_class_missing(str(error))  # a .h5's "Unknown layer"
        if missing is not None:
            raise common.UserError(missing) from None
        if "safe_mode" in str(error) or "unsafe" in str(error).lower():
            raise common.UserError(
                "the Keras file holds Python code (a Lambda layer?), which runs when loaded; "
                "pass --trust-pickle if you trust the file"
            ) from None
        raise common.UserError(f"Keras cannot load it: {common.first_line(error)}") from None
    except TypeError as error:  # a class whose code is not importable here
        missing = common.keras_class_missing(str(error))
        if missing is None:
            raise
        raise common.UserError(missing) from None
    except OSError as error:  # h5py on a damaged .h5
        raise common.UserError(
            f"cannot read it (truncated or corrupt?): {common.first_line(error)}"
        ) from None
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
            text_format.Parse((source / "saved_model.pbtxt").read_text(encoding="utf-8"), proto)
    except Exception as error:  # e.g. "Error parsing message"
        raise common.UserError(f"cannot read the SavedModel (truncated or corrupt?): "
                        f"{common.first_line(error)}") from None  # fmt: skip
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
    return tf1_graphs.route_tf1_savedmodel(source, metas, args)


def _route_tf2_savedmodel(source: Path, args):
    tf = common.load_tf()
    try:
        loaded = tf.saved_model.load(str(source))
    except (OSError, ValueError) as error:  # e.g. "Wire format was corrupt"
        raise common.UserError(f"cannot read the SavedModel (truncated or corrupt?): "
                        f"{common.first_line(error)}") from None  # fmt: skip
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        names = ", ".join(loaded.signatures) or "none"
        raise common.UserError(f"the SavedModel has no serving_default signature (it has: {names})")
    specs = signature.structured_input_signature[1]
    if len(specs) != 1:
        raise common.UserError(f"serving_default takes {len(specs)} inputs ({', '.join(specs)})")
    key, spec = next(iter(specs.items()))
    shape = common.nhwc(spec.shape.as_list(), args.shape, f"serving_default input '{key}'")

    def serve(x):  # through `loaded`: the signature alone does not keep its variables alive
        return loaded.signatures["serving_default"](**{key: x})

    return common.Route(shape, *common.traced_function(serve, shape, common.flat_numpy))


def route_tf2(source: Path, args):
    """A TF2 object checkpoint (.index + .data): the user's build function, restored strictly."""
    tf = common.load_tf()
    model = _build_user_model(args.model_class, json.loads(args.model_kwargs or "{}"))
    prefix = str(source.with_suffix(""))
    roots = {name.split("/")[0] for name, _ in tf.train.list_variables(prefix)}
    if "_CHECKPOINTABLE_OBJECT_GRAPH" not in roots:
        raise common.UserError("a name-based (TF1) checkpoint: give its .meta graph file instead")
    roots -= {"_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"}
    root = "model" if "model" in roots else (next(iter(roots)) if len(roots) == 1 else None)
    if root is None:
        raise common.UserError(
            f"the checkpoint holds {', '.join(sorted(roots))}: which is the model?"
        )
    route = _keras_model(model, args.shape, f"--model-class {args.model_class}")
    model(
        common.load_tf().zeros((1, *route.shape))
    )  # create the variables before restoring into them
    try:  # a wrong shape fails in read() (ValueError), a missing value in the assertion
        status = tf.train.Checkpoint(**{root: model}).read(prefix)
        if roots == {root}:
            status.assert_consumed()  # every value in the file restored into the model
        else:  # an optimizer's state beside the model stays unread: every model value must load
            status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:
        raise common.UserError(
            f"the checkpoint does not match --model-class {args.model_class}: "
            f"{common.first_line(error)[:300]}"
        ) from None
    return route


def _build_user_model(spec: str, kwargs: dict):
    """Run ``build_fn(**kwargs)`` from ``file.py:build_fn`` (as --model-class does for torch)."""
    location, _, name = spec.rpartition(":")
    if not location.endswith(".py") or not name:
        raise common.UserError(
            f"--model-class {spec!r}: expected file.py:build_fn for a TF checkpoint"
        )
    file = Path(location)
    if not file.is_file():
        raise common.UserError(f"--model-class: no such file {file}")
    module_spec = importlib.util.spec_from_file_location(f"_dafl_user_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.parent))  # its own modules beside it, as `python file.py` has
    try:
        module_spec.loader.exec_module(module)
        return getattr(module, name)(**kwargs)
    except Exception as error:
        raise common.UserError(f"--model-class {spec}: cannot build the model: {error}") from None
    finally:
        sys.path.remove(str(file.parent))


ROUTES = {
    "keras": route_keras,
    "savedmodel": route_savedmodel,
    "frozen": tf1_graphs.route_frozen,
    "tf1": tf1_graphs.route_tf1,
    "tf2": route_tf2,
    "tflite": tflite_route.route_tflite,
}


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
    (out / "result.json").write_text(json.dumps(result), encoding="utf-8")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="_tf_process/convert.py")
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
    except (common.UserError, SAFETY.UnsafeGraph) as error:
        (Path(args.out) / "error.txt").write_text(str(error), encoding="utf-8")
        return 2
    except Exception as error:  # tf2onnx or TensorFlow failed: the first line says why
        (Path(args.out) / "error.txt").write_text(
            f"{type(error).__name__}: {common.first_line(error)}", encoding="utf-8"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
