"""Two ONNX models run on the same inputs in onnxruntime (CPU): how closely an INT8 model
reproduces its float model (``compare_onnx``) and what one run costs (``latency_ms``)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compress_toolbox.errors import QuantizeError, first_line
from compress_toolbox.export.onnx_feed import Batch, as_feed
from compress_toolbox.export.writer import run_batched


@dataclass(frozen=True)
class Agreement:
    """How closely an INT8 model reproduces its float model on the same inputs (first output)."""

    samples: int
    top1: float | None  # argmax agreement over axis 1; None when the output has no class axis
    max_abs_diff: float
    mean_abs_diff: float
    # the task's own measure where top-1 means nothing (detection: fidelity mAP@0.5)
    task_figure: float | None = None
    task_measure: str | None = None

    @property
    def value(self) -> float | None:
        """The agreement figure: the task's own, else top-1."""
        return self.task_figure if self.task_measure else self.top1


def _session(model: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # onnxruntime's warnings are not the caller's to read
    try:
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise QuantizeError(f"{model}: onnxruntime cannot load it ({first_line(error)})") from error


def _run(model: Path, inputs: Batch, batch: int, threads: int) -> np.ndarray:
    """``model``'s first output over ``inputs``, ``batch`` samples per call (or the file's fixed
    batch)."""
    session = _session(model, threads)
    names = [(i.name, _ORT_TYPES.get(i.type, np.float32)) for i in session.get_inputs()]
    feed = as_feed(inputs, names, model)
    return np.concatenate([outputs[0] for outputs in run_batched(session, feed, batch)])


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(double)": np.float64, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def compare_onnx(float_model: Path, int8_model: Path, inputs: Batch, *, batch: int = 64,
                 threads: int = 1) -> Agreement:  # fmt: skip
    """Run both models on ``inputs`` (all samples, ``batch`` at a time) and compare their first
    outputs: argmax agreement over axis 1 (classes; per pixel for segmentation maps) when that
    axis has more than one entry, and the largest and mean absolute differences."""
    reference = _run(Path(float_model), inputs, batch, threads).astype(np.float64)
    quantised = _run(Path(int8_model), inputs, batch, threads).astype(np.float64)
    difference = np.abs(reference - quantised)
    top1 = None
    if reference.ndim >= 2 and reference.shape[1] > 1:
        top1 = float(np.mean(reference.argmax(axis=1) == quantised.argmax(axis=1)))
    return Agreement(len(reference), top1, float(difference.max(initial=0.0)),
                     float(difference.mean()) if difference.size else 0.0)  # fmt: skip


def latency_ms(model: Path, batch: Batch, *, runs: int = 20, threads: int = 1,
               warmup: int = 3) -> float:  # fmt: skip
    """Median wall time in milliseconds of one onnxruntime CPU run of ``model`` on ``batch``
    (``warmup`` runs first, not counted)."""
    session = _session(Path(model), threads)
    names = [(i.name, _ORT_TYPES.get(i.type, np.float32)) for i in session.get_inputs()]
    feed = as_feed(batch, names, model)
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
