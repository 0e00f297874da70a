"""TensorFlow and Keras teachers (.keras, .h5, SavedModel, frozen .pb, TF1/TF2 checkpoints,
TFLite): converted to ONNX by tf2onnx in a subprocess, imported by the ONNX importer, and
verified against TensorFlow's own outputs.

TensorFlow is never imported here: importing it beside torch segfaults, so the converter
(``_tf_process/convert.py``) runs in its own Python process and hands back an ONNX file plus
TensorFlow's outputs on fixed NHWC inputs. The optional extra ``dafl-compress[tf]`` provides
tensorflow-cpu and tf2onnx.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compress_toolbox.errors import DaflError, DaflWarning, ImportFailed
from compress_toolbox.export.onnx_inspect import dim_size
from compress_toolbox.export.verification import IMPORT_BATCHES, compare_to_outputs, tolerance_for
from compress_toolbox.load.analysis import output_tensor
from compress_toolbox.load.importers.base import (
    CHANNELS_LAST,
    FileHead,
    ImportedModel,
    register_importer,
)
from compress_toolbox.load.importers.onnx_file import import_onnx
from compress_toolbox.tasks.outputs import JOIN_KINDS, join_kind_of, join_tensors

CONVERTER = Path(__file__).with_name("_tf_process") / "convert.py"
# Run by path through runpy, not ``-m``: ``-m`` would import compress_toolbox (and torch), and a
# script's own folder on sys.path would let this file shadow the real ``tensorflow``.
LAUNCH = "import runpy, sys; sys.exit(runpy.run_path(sys.argv[1])['main'](sys.argv[2:]))"
INSTALL_HINT = 'pip install "dafl-compress[tf]"'
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# int8 TFLite: the ONNX model computes in float with the dequantised weights, the interpreter
# rounds every activation to 8 bits; they agree to about 1e-2 (LeNet), not 1e-4.
INT8_RTOL = 0.1
KIND_NAMES = {
    "keras": "Keras model",
    "savedmodel": "SavedModel",
    "frozen": "frozen graph",
    "tf1": "TF1 checkpoint",
    "tf2": "TF2 checkpoint",
    "tflite": "TFLite model",
}


@dataclass
class Conversion:
    """What the converter process hands back."""

    onnx_path: Path
    input_name: str
    nhwc: tuple[int, int, int]  # H, W, C of TensorFlow's input
    outputs: list[str]  # ONNX output names, in TensorFlow's output order
    references: list[tuple[np.ndarray, list[np.ndarray]]]  # (NHWC input, TF outputs)
    notes: list[str]


def tf_kind(path: Path) -> str | None:
    """Which TensorFlow format ``path`` is (a KIND_NAMES key), from its name and first bytes."""
    if path.is_dir():
        has_graph = (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()
        return "savedmodel" if has_graph else None
    suffix = path.suffix.lower()
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head == HDF5_MAGIC or (suffix == ".keras" and head.startswith(b"PK")):
        return "keras"
    if head[4:8] == b"TFL3":
        return "tflite"
    if suffix == ".meta" or (suffix == ".index" and path.with_suffix(".meta").is_file()):
        return "tf1"
    if suffix == ".index":
        return "tf2"
    if path.name == "saved_model.pb":
        return "savedmodel"
    return "frozen" if suffix == ".pb" else None


def _sniff(info: FileHead) -> bool:
    return tf_kind(info.path) is not None


def _source(path: Path, kind: str) -> Path:
    """The path the converter reads: the folder of a saved_model.pb, the .meta of a TF1 .index."""
    if kind == "savedmodel" and path.is_file():
        return path.parent.resolve()
    if kind == "tf1":
        return path.with_suffix(".meta").resolve()
    return path.resolve()


def _check_options(path: Path, kind: str, options: dict) -> None:
    if kind == "tf2" and not options.get("model_class"):
        raise ImportFailed(
            f"{path}: a TF2 checkpoint holds only weights, not the model: give the code "
            "that builds it with --model-class file.py:build_fn (returning the Keras model)"
        )
    shape = options.get("input_shape")
    if shape and len(shape) != 3:
        raise ImportFailed(f"--input-shape {tuple(shape)}: a TensorFlow image model needs C,H,W")


def _check_extra(path: Path, kind: str) -> None:
    missing = [name for name in ("tensorflow", "tf2onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportFailed(
            f"{path}: reading a {KIND_NAMES[kind]} needs {' and '.join(missing)}: {INSTALL_HINT}"
        )


def _absolute_spec(spec: str) -> str:
    """``file.py:build_fn`` with the file's path made absolute (the converter runs elsewhere)."""
    location, _, name = spec.rpartition(":")
    return f"{Path(location).resolve()}:{name}" if location.endswith(".py") else spec


def _converter_args(path: Path, kind: str, out: Path, options: dict) -> list[str]:
    args = ["--kind", kind, "--source", str(_source(path, kind)), "--out", str(out),
            "--batches", ",".join(map(str, IMPORT_BATCHES))]  # fmt: skip
    if options.get("input_shape"):
        shape = tuple(options["input_shape"])
        args += ["--shape", ",".join(map(str, (*shape[1:], shape[0])))]
    if kind == "tf2":
        args += ["--model-class", _absolute_spec(options["model_class"])]
        args += ["--model-kwargs", json.dumps(options.get("model_kwargs") or {})]
    if options.get("trust_pickle"):
        args.append("--trust-code")
    return args


def _converter_env() -> dict[str, str]:
    """The user's environment, with PYTHONPATH made absolute (the converter's working folder is
    not the user's), the working folder kept off sys.path (Python 3.11+) and UTF-8 for its
    output (TensorFlow's messages are not always in Windows' code page)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONSAFEPATH": "1", "PYTHONUTF8": "1"}
    if env.get("PYTHONPATH"):
        entries = env["PYTHONPATH"].split(os.pathsep)
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in entries if p)
    return env


def _run_converter(path: Path, kind: str, out: Path, options: dict) -> Conversion:
    """Run the converter in its own process, in an empty working folder of its own (a relative
    path in a graph resolves there, and it is deleted after); its one-line error becomes ours."""
    command = [sys.executable, "-c", LAUNCH, str(CONVERTER),
               *_converter_args(path, kind, out, options)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dafl-tf-cwd-") as cwd:
        done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace",
                              env=_converter_env(), cwd=cwd)  # fmt: skip
    error = out / "error.txt"
    if done.returncode or not (out / "result.json").is_file():
        if error.is_file():
            message = error.read_text(encoding="utf-8", errors="replace").strip()
        else:  # the process died (a crash in TensorFlow): its last line of output
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            message = f"the TensorFlow converter failed: {lines[-1][:300]}"
        raise ImportFailed(f"{path}: {message}")
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    arrays = np.load(out / "reference.npz")
    count = len(result["outputs"])
    references = []
    for i in range(len([key for key in arrays.files if key.startswith("x")])):
        references.append((arrays[f"x{i}"], [arrays[f"y{i}_{k}"] for k in range(count)]))
    return Conversion(out / "model.onnx", result["input"], tuple(result["nhwc"]),
                      result["outputs"], references, result["notes"])  # fmt: skip


def _check_nchw(conversion: Conversion, path: Path) -> tuple[int, int, int]:
    """(C, H, W): the ONNX input must be [N,C,H,W] (a wrong inputs_as_nchw name is ignored)."""
    model = onnx.load(str(conversion.onnx_path), load_external_data=False)
    dims = [d.dim_param or dim_size(d) for d in model.graph.input[0].type.tensor_type.shape.dim]
    height, width, channels = conversion.nhwc
    fixed = [dim for dim in dims[2:] if isinstance(dim, int)]
    if len(dims) != 4 or dims[1] != channels or fixed not in ([], [height, width]):
        raise ImportFailed(
            f"{path}: the converted input '{conversion.input_name}' is {dims}, not "
            f"[N,{channels},{height},{width}] (tf2onnx did not make it channels-first)"
        )
    return channels, height, width


def _import_onnx(conversion: Conversion, shape: tuple[int, ...], path: Path,
                 join_outputs: bool) -> ImportedModel:  # fmt: skip
    """The ONNX importer on the converted file, its messages (errors and warnings) naming the
    user's file."""

    def renamed(text: str) -> str:
        return text.replace(str(conversion.onnx_path), f"{path} (converted to ONNX)")

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            imported = import_onnx(conversion.onnx_path, input_shape=shape,
                                   join_outputs=join_outputs)  # fmt: skip
    except DaflError as error:
        raise type(error)(renamed(str(error))) from None
    for warning in caught:  # given again, ours naming the user's file
        message = warning.message
        if isinstance(message, DaflWarning):
            message = type(message)(renamed(str(message)))
        warnings.warn_explicit(message, warning.category, warning.filename, warning.lineno)
    return imported


def _verify_against_tf(module: nn.Module, conversion: Conversion, outputs: list[int],
                       kind: str | None, path: Path,
                       rtol: float) -> tuple[float, float]:  # fmt: skip
    """Max (abs, relative) difference of ``module`` on TensorFlow's own inputs (NHWC, given
    NCHW) against the outputs TensorFlow recorded for them (verification.compare_to_outputs);
    several ``outputs`` (indices) joined the ``kind`` way, as the import joined them."""

    def imported(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        return output_tensor(out).numpy()

    def joined(recorded: list[np.ndarray]) -> np.ndarray:
        return join_tensors([torch.from_numpy(recorded[i]) for i in outputs], kind).numpy()

    pairs = [(x, joined(recorded)) for x, recorded in conversion.references]
    return compare_to_outputs(imported, pairs, source=path, what="imported model", rtol=rtol,
                              original="TensorFlow")


def _stamps(path: Path, kind: str, options: dict) -> tuple[tuple[str, int, int], ...]:
    """(file, modification time, size) of every file the conversion reads: a SavedModel's
    folder, a checkpoint's files beside its name (.meta, .index, .data-*), a TF2 checkpoint's
    model code."""
    source = _source(path, kind)
    if source.is_dir():
        files = [p for p in source.rglob("*") if p.is_file()]
    else:
        files = [p for p in source.parent.iterdir()
                 if p.name.startswith(source.stem) and p.is_file()]
    code = str(options.get("model_class") or "").rpartition(":")[0]
    files += [Path(code)] if code.endswith(".py") and Path(code).is_file() else []
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(files))


class LastConversion:
    """The process's last conversion, kept with its folder: reading the same unchanged file
    with the same options again (the student command reads a detector once as it is and once
    as one head) does not start TensorFlow again (~15 s, most of it importing TensorFlow)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._folder: tempfile.TemporaryDirectory | None = None
        self._conversion: Conversion | None = None

    def get(self, path: Path, kind: str, options: dict) -> Conversion:
        """The conversion of ``path``, made now unless it is the last one made."""
        args = _converter_args(path, kind, Path(), options)
        key = (kind, tuple(args), _stamps(path, kind, options))
        if key != self._key or not self._conversion.onnx_path.is_file():
            folder = tempfile.TemporaryDirectory(prefix="dafl-tf-")
            try:
                conversion = _run_converter(path, kind, Path(folder.name), options)
            except BaseException:
                folder.cleanup()
                raise
            self.clear()
            self._key, self._folder, self._conversion = key, folder, conversion
        return self._conversion

    def clear(self) -> None:
        """Delete the kept conversion's folder."""
        if self._folder is not None:
            self._folder.cleanup()
        self._key = self._folder = self._conversion = None


_LAST_CONVERSION = LastConversion()


@register_importer("tensorflow", _sniff)
def import_tensorflow(path: Path, **options) -> ImportedModel:
    """Convert with tf2onnx (opset 17, NCHW input) in a subprocess, import the ONNX, and check
    the result against TensorFlow (and the ONNX file against onnxruntime)."""
    kind = tf_kind(path)
    _check_options(path, kind, options)
    _check_extra(path, kind)
    conversion = _LAST_CONVERSION.get(path, kind, options)
    shape = _check_nchw(conversion, path)
    imported = _import_onnx(conversion, shape, path, options.get("join_outputs", False))
    join = join_kind_of(imported.details)
    joined = imported.details[JOIN_KINDS[join]] if join else None
    names = [name for name, _ in joined] if joined else [imported.details["output"]]
    outputs = [conversion.outputs.index(name) for name in names]
    int8 = "tflite-int8" in conversion.notes
    rtol = INT8_RTOL if int8 else tolerance_for(imported.details["weights"])
    max_abs, max_rel = _verify_against_tf(imported.module, conversion, outputs, join, path, rtol)
    if int8:
        warnings.warn(
            DaflWarning(
                f"{path}: int8 TFLite model: the teacher uses its dequantised weights in float "
                f"arithmetic (differs from the int8 interpreter by {max_rel:.1e}); give the "
                "float model if you have it"
            ),
            stacklevel=2,
        )
    details = {
        "tf_format": KIND_NAMES[kind],
        "verified_against": "TensorFlow (NHWC inputs transposed) and onnxruntime",
        "input_layout": CHANNELS_LAST,  # the module takes the images channels first
        "converted_by": f"tf2onnx, opset {imported.details['opset']}",
        "onnx_max_rel_diff": imported.max_rel_diff,
        "output": imported.details["output"],
        "weights": "int8 (dequantised)" if int8 else imported.details["weights"],
    }
    for key in ("outputs_not_distilled", "distilled_output", "one_detection_head",
                *JOIN_KINDS.values()):  # fmt: skip
        if key in imported.details:
            details[key] = imported.details[key]
    return ImportedModel(imported.module, shape, max_abs, max_rel, details)
