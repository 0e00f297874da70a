"""TensorFlow/Keras teachers: every format imports and matches TensorFlow's own outputs.

TensorFlow is never imported in this process (beside torch it segfaults): tests/tf_models.py
builds and saves the Keras models in a subprocess, once per session, and the importer converts
in a subprocess too. Each conversion costs ~15 s on 2 cores (most of it importing TensorFlow),
so the default run converts only the LeNet ``.keras`` file; every other format and the
ResNet/MobileNetV2 teachers are ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from models import example
from torch import nn

from cli.main import main
from compress_toolbox import ImportFailed, VerificationFailed, load_teacher, make_student
from compress_toolbox.errors import DaflWarning
from compress_toolbox.export.writer import export_onnx, verify_onnx
from compress_toolbox.load.importers import detect_format
from compress_toolbox.load.importers import tensorflow as tf_importer

HERE = Path(__file__).parent
HAS_TF = all(importlib.util.find_spec(name) for name in ("tensorflow", "tf2onnx"))
needs_tf = pytest.mark.skipif(not HAS_TF, reason='needs the tf extra: pip install -e ".[tf]"')
INPUTS = {"lenet": (1, 28, 28), "resnet": (3, 32, 32), "mobilenet": (3, 32, 32)}
FORMATS = ("keras", "h5", "savedmodel", "frozen", "tf1", "tf2", "tflite", "tflite_int8")
DEFAULT = {("lenet", "keras")}  # the one conversion in the fast suite


def _build(folder: Path, *models: str) -> dict[str, dict[str, str]]:
    done = subprocess.run(
        [sys.executable, str(HERE / "tf_models.py"), str(folder), *models],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tf_files(tmp_path_factory):
    """{model: {format: path}}: LeNet at once, ResNet and MobileNetV2 when a slow test asks."""
    if not HAS_TF:
        pytest.skip('needs the tf extra: pip install -e ".[tf]"')
    root = tmp_path_factory.mktemp("tf")
    files = _build(root / "lenet", "lenet")

    def get(model: str) -> dict[str, str]:
        if model not in files:
            files.update(_build(root / "big", "resnet", "mobilenet"))
        return files[model]

    return get


def _load(path: str, model: str, fmt: str):
    """load_teacher, and the DaflWarnings it gave."""
    options = {"model_class": f"{HERE / 'tf_models.py'}:{model}"} if fmt == "tf2" else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        teacher = load_teacher(path, **options)
    return teacher, [str(w.message) for w in caught if issubclass(w.category, DaflWarning)]


@pytest.fixture(scope="session")
def keras_lenet(tf_files):
    """The LeNet .keras teacher, converted once for the fast tests."""
    return _load(tf_files("lenet")["keras"], "lenet", "keras")


def _cases():
    for model in INPUTS:
        for fmt in FORMATS:
            marks = [] if (model, fmt) in DEFAULT else [pytest.mark.slow]
            yield pytest.param(model, fmt, id=f"{model}-{fmt}", marks=marks)


@needs_tf
@pytest.mark.parametrize("model, fmt", list(_cases()))
def test_format_imports_verifies_and_gives_a_student(tf_files, keras_lenet, model, fmt,
                                                    tmp_path):  # fmt: skip
    if (model, fmt) == ("lenet", "keras"):
        teacher, notices = keras_lenet
    else:
        teacher, notices = _load(tf_files(model)[fmt], model, fmt)
    assert teacher.format == "tensorflow"
    assert teacher.input_shape == INPUTS[model]  # channels first, from an NHWC model
    assert teacher.num_outputs == 10
    quantised = [notice for notice in notices if "int8" in notice]
    if fmt == "tflite_int8":
        assert quantised and teacher.details["weights"] == "int8 (dequantised)"
        assert teacher.max_rel_diff < tf_importer.INT8_RTOL
    else:
        assert not quantised
        assert teacher.max_rel_diff < 1e-4, teacher.max_rel_diff
    assert teacher.details["onnx_max_rel_diff"] < 1e-4
    assert "TensorFlow" in teacher.details["verified_against"]
    with torch.no_grad():  # runs at any batch
        assert teacher.module(torch.randn(5, *INPUTS[model])).shape == (5, 10)
    _check_student(teacher, tmp_path)


@needs_tf
def test_an_unchanged_file_read_again_is_not_converted_again(tf_files, keras_lenet, monkeypatch):
    path = Path(tf_files("lenet")["keras"])
    load_teacher(path)  # converted now, or kept from keras_lenet
    calls = []

    def converter(*args):
        calls.append(args)
        raise ImportFailed("converted again")

    monkeypatch.setattr(tf_importer, "_run_converter", converter)
    teacher = load_teacher(path, join_outputs=True)  # what the student command does
    assert not calls and teacher.input_shape == INPUTS["lenet"]
    with pytest.raises(ImportFailed, match="converted again"):  # other options: converted
        load_teacher(path, input_shape=(1, 28, 28))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        with pytest.raises(ImportFailed, match="converted again"):  # changed: converted
            load_teacher(path)
    finally:  # the session's file as it was, still the one kept
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@needs_tf
@pytest.mark.slow
def test_dynamic_range_tflite_is_refused(tf_files):
    with pytest.raises(ImportFailed, match="dynamic-range.*float model"):
        load_teacher(tf_files("lenet")["tflite_dynamic"])


@needs_tf
@pytest.mark.slow
def test_tf2_checkpoint_of_another_model_is_refused(tf_files):
    lenet_checkpoint = tf_files("lenet")["tf2"]
    with pytest.raises(ImportFailed, match="does not match --model-class"):
        load_teacher(lenet_checkpoint, model_class=f"{HERE / 'tf_models.py'}:resnet")


def _check_student(teacher, tmp_path) -> None:
    """A half-width student (ratio 0.15-0.40) that exports to ONNX and agrees with onnxruntime:
    tf2onnx's MatMul+Add dense layers, Mul/Add BatchNorm and H,W,C flatten are made prunable
    by onnx_cleanup."""
    shape = teacher.input_shape
    student = make_student(teacher.module, width=0.5, example_input=example(shape, batch=2))
    ratio = sum(p.numel() for p in student.parameters()) / sum(
        p.numel() for p in teacher.module.parameters()
    )
    assert 0.15 <= ratio <= 0.40, ratio
    path = export_onnx(student, shape, tmp_path / "student.onnx")
    assert verify_onnx(student, path, shape)[0] < 1e-3


def test_tf2_checkpoint_needs_the_model_code(tmp_path, capsys):
    _touch(tmp_path / "ckpt.data-00000-of-00001")
    index = _touch(tmp_path / "ckpt.index")
    with pytest.raises(ImportFailed, match="holds only weights.*--model-class file.py:build_fn"):
        load_teacher(index)
    assert main(["inspect", str(index)]) == 2  # the command line: one line, no traceback
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ckpt.index: a TF2 checkpoint holds only" in err, err


def test_missing_extra_says_how_to_install(tmp_path, monkeypatch):
    model = tmp_path / "model.h5"
    model.write_bytes(tf_importer.HDF5_MAGIC + b"\0" * 64)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ImportFailed, match=r'model.h5: .*pip install "dafl-compress\[tf\]"'):
        load_teacher(model)


def _tf_common():
    """The converter's shared module, loaded by path (it imports no TensorFlow)."""
    path = Path(tf_importer.__file__).parent / "_tf_process" / "tf_common.py"
    spec = importlib.util.spec_from_file_location("dafl_tf_common", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def test_a_keras_class_whose_code_is_missing_is_named_without_keras_config_dump():
    """Keras ends these errors in the model's whole config (thousands of characters); the user
    gets the class, the package to install where there is one, and the SavedModel way out."""
    config = "Full object config: {'module': 'keras_cv.src.models', " + "'x': 1, " * 500 + "}"
    cv = _tf_common().keras_class_missing(
        "Could not deserialize class 'YOLOV8Detector' because its parent module "
        "keras_cv.src.models.object_detection.yolo_v8.yolo_v8_detector cannot be imported. "
        + config)
    assert cv.startswith("the Keras model's class YOLOV8Detector is defined in the Python "
                         "package keras_cv (keras_cv.src.models.object_detection.yolo_v8")
    assert "make keras_cv importable" in cv and "model.export(DIR)" in cv and len(cv) < 400
    own = _tf_common().keras_class_missing(
        f"Could not locate class 'Scale'. Make sure custom classes are decorated. {config}")
    assert "custom class, Scale," in own and "model.export(DIR)" in own and len(own) < 400
    h5 = _tf_common().keras_class_missing("Unknown layer: 'Shift'. Please ensure you are using")
    assert "custom class, Shift," in h5
    assert _tf_common().keras_class_missing("Could not interpret initializer") is None


@needs_tf
@pytest.mark.slow
def test_a_keras_file_with_a_custom_layer_is_refused_in_one_line(tmp_path, capsys):
    script = (
        "import keras\n"
        "class Shift(keras.layers.Layer):\n"
        "    def call(self, x):\n"
        "        return x + 1.0\n"
        "inputs = keras.Input((8, 8, 1))\n"
        "x = keras.layers.GlobalAveragePooling2D()(Shift()(keras.layers.Conv2D(4, 3)(inputs)))\n"
        f"keras.Model(inputs, keras.layers.Dense(3)(x)).save({str(tmp_path / 'm.keras')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main(["inspect", str(tmp_path / "m.keras")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "uses a custom class, Shift," in err, err


def _touch(path: Path, data: bytes = b"\0" * 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_formats_are_detected(tmp_path):
    cases = {
        _touch(tmp_path / "m.keras", b"PK\x03\x04" + b"\0" * 28): "keras",
        _touch(tmp_path / "weights.h5", tf_importer.HDF5_MAGIC + b"\0" * 24): "keras",
        _touch(tmp_path / "m.tflite", b"\x1c\0\0\0TFL3" + b"\0" * 24): "tflite",
        _touch(tmp_path / "graph.pb"): "frozen",
        _touch(tmp_path / "v1" / "model.ckpt.meta"): "tf1",
        _touch(tmp_path / "v1" / "model.ckpt.index"): "tf1",
        _touch(tmp_path / "v2" / "ckpt-3.index"): "tf2",
        _touch(tmp_path / "sm" / "saved_model.pb").parent: "savedmodel",
    }
    for path, kind in cases.items():
        assert tf_importer.tf_kind(path) == kind, path
        assert detect_format(path) == "tensorflow", path
    assert tf_importer.tf_kind(tmp_path / "v1") is None
    with pytest.raises(ImportFailed, match="is a directory"):
        detect_format(tmp_path / "v1")


def _flat_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 3)).eval()


def _conversion(module: nn.Module, layout_bug: bool) -> tf_importer.Conversion:
    """TensorFlow's reference as the NHWC model would give it (or with H and C swapped)."""
    x = np.random.default_rng(0).standard_normal((3, 4, 4, 2)).astype(np.float32)
    nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():  # the bug: H and C swapped, same number of values
        y = module(nchw.transpose(1, 2) if layout_bug else nchw).numpy()
    return tf_importer.Conversion(Path("m.onnx"), "input", (4, 4, 2), ["out"], [(x, [y])], [])


def test_verification_against_tensorflow_catches_a_layout_mistake():
    module = _flat_linear()
    good = tf_importer._verify_against_tf(module, _conversion(module, False), [0], None, Path("m"),
                                       1e-4)  # fmt: skip
    assert good[1] < 1e-6
    with pytest.raises(VerificationFailed, match="m: the imported model differs from TensorFlow"):
        tf_importer._verify_against_tf(module, _conversion(module, True), [0], None, Path("m"),
                                       1e-4)  # fmt: skip


@needs_tf
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["keras", "h5", "tflite"])
def test_truncated_files_are_named_as_damaged(tf_files, tmp_path, fmt):
    original = Path(tf_files("lenet")[fmt])
    damaged = tmp_path / original.name
    damaged.write_bytes(original.read_bytes()[: original.stat().st_size // 3])
    with pytest.raises(ImportFailed, match="truncated or corrupt"):
        load_teacher(damaged)


@needs_tf
@pytest.mark.slow  # ~25 s: a Keras build and a conversion; the ONNX form is in the fast suite
def test_a_keras_yolo_heads_levels_channels_last_distil_into_a_drop_in_student(tmp_path, capsys):
    """keras-yolo3's raw levels, (N, h, w, anchors * (5 + K)): read as a YOLO head (refused
    before), verified against TensorFlow, and the student gives the same two outputs."""
    files = _build(tmp_path / "det", "--detector")
    out = tmp_path / "out"
    code = main([files["keras"], "--task", "detection", "--iters", "2", "--threads", "1",
                 "--no-progress", "--out", str(out)])  # fmt: skip
    assert code in (0, 3), capsys.readouterr().err  # an untrained teacher: either verdict
    report = json.loads((out / "report.json").read_text())
    layout = report["detection"]["layout"]  # tf2onnx names the outputs Identity:0, ...
    assert "(N, 4, 4, 24)" in layout and "(N, 2, 2, 24)): 3 anchor(s) per cell" in layout
    assert report["teacher"]["distilled_output"].startswith("every level's output (channels")
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()  # channels last, as the Keras model takes it
    outputs = session.run(None, {image.name: np.zeros((2, 32, 32, 3), np.float32)})
    assert [o.shape for o in outputs] == [(2, 4, 4, 24), (2, 2, 2, 24)]
    assert report["exported_as"]["input_layout"] == "channels last (N, H, W, C)"
    assert "student.onnx input: float32 `[batch, 32, 32, 3]` (channels last" in (
        out / "report.md").read_text()  # fmt: skip
