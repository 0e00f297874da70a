"""Small Keras teachers saved in every TensorFlow format, for tests/test_tensorflow.py, and
hostile TensorFlow files for tests/test_tf_code_safety.py.

Run as a script in its own process (TensorFlow and torch in one process segfault):
    python tests/tf_models.py OUT_DIR lenet [resnet mobilenet]
writes OUT_DIR/<model>/<file> for each format and OUT_DIR/manifest.json ({model: {format: file}});
    python tests/tf_models.py OUT_DIR --detector
writes OUT_DIR/yolo_levels.keras (``yolo_levels``) and OUT_DIR/manifest.json ({"keras": file});
    python tests/tf_models.py OUT_DIR --hostile MARKER_DIR
writes files whose graphs write a file into MARKER_DIR when TensorFlow runs them, and
OUT_DIR/manifest.json ({case: file}).
The build functions double as ``--model-class tf_models.py:lenet`` for TF2 checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

INPUTS = {"lenet": (28, 28, 1), "resnet": (32, 32, 3), "mobilenet": (32, 32, 3)}


def lenet() -> keras.Model:
    """LeNet-5 on 28x28x1 (61,706 parameters), logits out."""
    return keras.Sequential(
        [
            keras.Input(INPUTS["lenet"]),
            layers.Conv2D(6, 5, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(16, 5, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(120, activation="relu"),
            layers.Dense(84, activation="relu"),
            layers.Dense(10),
        ]
    )


def yolo_levels() -> keras.Model:
    """A YOLO head's raw levels as keras-yolo3 gives them, channels last: on 32x32x3,
    (N, 4, 4, 24) and (N, 2, 2, 24), 3 anchors of 5 + 3 values per cell, strides 8 and 16."""
    image = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(image)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    fine = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    coarse = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(fine)
    return keras.Model(image, [layers.Conv2D(24, 1, name="p3")(fine),
                               layers.Conv2D(24, 1, name="p4")(coarse)])  # fmt: skip


def _block(x, filters: int, stride: int):
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = layers.ReLU()(layers.BatchNormalization()(y))
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization()(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(x)
        shortcut = layers.BatchNormalization()(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def resnet() -> keras.Model:
    """A small ResNet (BatchNorm, identity and 1x1 shortcuts) on 32x32x3."""
    inputs = keras.Input(INPUTS["resnet"])
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = _block(x, 16, 1)
    x = _block(x, 32, 2)
    x = _block(x, 64, 2)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10)(x))


def mobilenet() -> keras.Model:
    """Keras MobileNetV2 (alpha 0.35, random weights) on 32x32x3, logits out."""
    return keras.applications.MobileNetV2(
        input_shape=INPUTS["mobilenet"], alpha=0.35, weights=None, classes=10,
        classifier_activation=None,
    )  # fmt: skip


def _randomise_batchnorm(model: keras.Model, rng: np.random.Generator) -> None:
    """Fresh BatchNorm layers are the identity: give them statistics so verification bites."""
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 1.5, var.shape),
            ])  # fmt: skip


def _frozen_graph(model: keras.Model):
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name="x")
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    return convert_variables_to_constants_v2(function).graph.as_graph_def()


def _save_tf1_checkpoint(graph_def, prefix: Path) -> None:
    """A TF1 graph with variables: the frozen graph's weight constants become variables."""
    v1 = tf.compat.v1
    with tf.Graph().as_default() as graph:
        weights = {
            node.name: tf.make_ndarray(node.attr["value"].tensor)
            for node in graph_def.node
            if node.op == "Const" and node.attr["value"].tensor.tensor_shape.dim
        }
        weights = {name: value for name, value in weights.items() if value.size > 1}
        variables = {name: v1.Variable(value, name=f"var_{i}") for i, (name, value) in
                     enumerate(weights.items())}  # fmt: skip
        tf.import_graph_def(
            graph_def, name="",
            input_map={f"{name}:0": var.value() for name, var in variables.items()},
        )  # fmt: skip
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            v1.train.Saver().save(session, str(prefix))


def _tflite(saved_model: Path, mode: str, shape: tuple[int, ...]) -> bytes:
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if mode in ("int8", "dynamic"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8":
        rng = np.random.default_rng(1)
        converter.representative_dataset = lambda: (
            [rng.standard_normal((1, *shape)).astype(np.float32)] for _ in range(20)
        )
    return converter.convert()


def save_all(name: str, out: Path) -> dict[str, str]:
    """Build ``name`` and write it in every format; {format: path}."""
    keras.utils.set_random_seed(0)
    model = globals()[name]()
    _randomise_batchnorm(model, np.random.default_rng(0))
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "keras": folder / "model.keras",
        "h5": folder / "model.h5",
        "savedmodel": folder / "savedmodel",
        "frozen": folder / "frozen.pb",
        "tf1": folder / "tf1" / "model.ckpt.meta",
        "tf2": folder / "tf2" / "ckpt.index",
        "tflite": folder / "float.tflite",
        "tflite_int8": folder / "int8.tflite",
        "tflite_dynamic": folder / "dynamic.tflite",
    }
    model.save(files["keras"])
    model.save(files["h5"])
    model.export(str(files["savedmodel"]), verbose=False)
    graph_def = _frozen_graph(model)
    files["frozen"].write_bytes(graph_def.SerializeToString())
    files["tf1"].parent.mkdir()
    _save_tf1_checkpoint(graph_def, files["tf1"].with_suffix(""))
    tf.train.Checkpoint(model=model).write(str(files["tf2"].with_suffix("")))
    shape = INPUTS[name]
    for mode in ("float", "int8", "dynamic"):
        key = "tflite" if mode == "float" else f"tflite_{mode}"
        files[key].write_bytes(_tflite(files["savedmodel"], mode, shape))
    return {key: str(path) for key, path in files.items()}


class _WritesWhenServed(tf.Module):
    """A 1x1 convolution whose serving function also writes a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)
        self.kernel = tf.Variable(tf.ones((1, 1, 1, 2)))

    @tf.function(input_signature=[tf.TensorSpec((None, 4, 4, 1), tf.float32)])
    def __call__(self, x):
        tf.io.write_file(self.marker, "written by the serving function")
        return tf.nn.conv2d(x, self.kernel, 1, "VALID")


class _WritingResource(tf.saved_model.experimental.TrackableResource):
    """A resource whose initialiser, run by the SavedModel loader, writes a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)
        super().__init__()

    def _create_resource(self):
        return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="dafl_resource")

    def _initialize(self):
        tf.io.write_file(self.marker, "written by a resource initialiser")
        return tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=1.0)


class _Conv(tf.Module):
    def __init__(self, marker: Path):
        self.resource = _WritingResource(marker)
        self.kernel = tf.Variable(tf.ones((1, 1, 1, 2)))

    @tf.function(input_signature=[tf.TensorSpec((None, 4, 4, 1), tf.float32)])
    def __call__(self, x):
        return tf.nn.conv2d(x, self.kernel, 1, "VALID")


def _tf1_graph_writing(marker: Path):
    """A TF1 graph (input, one variable, 1x1 conv), a Saver, and a WriteFile op named 'write'."""
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, (None, 4, 4, 1), name="input")
        kernel = v1.Variable(tf.ones((1, 1, 1, 2)), name="kernel")
        y = tf.nn.conv2d(x, kernel, 1, "VALID", name="output")
        saver = v1.train.Saver()
        tf.io.write_file(str(marker), "written by the restore op", name="write")
    return graph, x, y, saver


def _point_restore_at_write(meta_graph) -> None:
    meta_graph.saver_def.restore_op_name = "write"


def save_hostile(out: Path, markers: Path) -> dict[str, str]:
    """Each case's file; each writes markers/<case> if TensorFlow runs its graph."""
    from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

    out.mkdir(parents=True, exist_ok=True)
    files = {case: out / name for case, name in (
        ("savedmodel_serving", "serving"), ("savedmodel_initialiser", "initialiser"),
        ("tf1_restore", "tf1/model.ckpt.meta"), ("tf1_savedmodel_restore", "tf1_savedmodel"),
        ("tflite_flex", "flex.tflite"),
    )}  # fmt: skip
    serving = _WritesWhenServed(markers / "savedmodel_serving")
    tf.saved_model.save(serving, str(files["savedmodel_serving"]), signatures=serving.__call__)
    conv = _Conv(markers / "savedmodel_initialiser")
    tf.saved_model.save(conv, str(files["savedmodel_initialiser"]), signatures=conv.__call__)

    v1 = tf.compat.v1
    graph, _, _, saver = _tf1_graph_writing(markers / "tf1_restore")
    with v1.Session(graph=graph) as session:
        session.run(v1.global_variables_initializer())
        saver.save(session, str(files["tf1_restore"].with_suffix("")))
    meta = meta_graph_pb2.MetaGraphDef()
    meta.ParseFromString(files["tf1_restore"].read_bytes())
    _point_restore_at_write(meta)
    files["tf1_restore"].write_bytes(meta.SerializeToString())

    graph, x, y, _ = _tf1_graph_writing(markers / "tf1_savedmodel_restore")
    with v1.Session(graph=graph) as session:
        session.run(v1.global_variables_initializer())
        builder = v1.saved_model.Builder(str(files["tf1_savedmodel_restore"]))
        signature = v1.saved_model.predict_signature_def({"x": x}, {"y": y})
        builder.add_meta_graph_and_variables(session, ["serve"], {"serving_default": signature})
        builder.save()
    proto_file = files["tf1_savedmodel_restore"] / "saved_model.pb"
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(proto_file.read_bytes())
    _point_restore_at_write(proto.meta_graphs[0])
    proto_file.write_bytes(proto.SerializeToString())

    @tf.function(input_signature=[tf.TensorSpec((1, 4, 4, 1), tf.float32)])
    def flex(x):
        tf.io.write_file(str(markers / "tflite_flex"), "written by a Select TensorFlow op")
        return x * 2.0

    converter = tf.lite.TFLiteConverter.from_concrete_functions([flex.get_concrete_function()])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                           tf.lite.OpsSet.SELECT_TF_OPS]  # fmt: skip
    files["tflite_flex"].write_bytes(converter.convert())
    return {case: str(path) for case, path in files.items()}


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    if argv[1:2] == ["--hostile"]:
        manifest = save_hostile(out, Path(argv[2]))
    elif argv[1:2] == ["--detector"]:
        keras.utils.set_random_seed(0)
        out.mkdir(parents=True, exist_ok=True)
        yolo_levels().save(out / "yolo_levels.keras")
        manifest = {"keras": str(out / "yolo_levels.keras")}
    else:
        manifest = {name: save_all(name, out) for name in argv[1:]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
