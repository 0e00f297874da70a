"""Measuring a detection teacher and its student: the teacher in PyTorch, the student
as shipped (``student.onnx`` in onnxruntime), both decoded and NMSed the same way, scored by
COCOeval: mAP on the eval data, and fidelity (the student's mAP against the teacher's own
detections) on the eval images or, without eval data, on generated inputs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compress_toolbox.batching import batch_for, run_in_batches
from compress_toolbox.export.writer import onnx_session, run_batched
from compress_toolbox.tasks.base import TaskScores
from compress_toolbox.tasks.detection.data import DetectionEvalData
from compress_toolbox.tasks.detection.decode import (
    DETECTION_THRESHOLD,
    Decoding,
    Detections,
    encoded_scale,
)
from compress_toolbox.tasks.detection.metrics import GroundTruth, MapScores, mean_average_precision
from compress_toolbox.tasks.outputs import join_tensors

GENERATED_SCENES = 256  # generated inputs for the fidelity figure without eval data
BATCH = 64  # images run at once, fewer for large ones (batching.batch_for)
FIGURE = "mAP@0.5"


def torch_outputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Raw outputs of ``module`` (eval mode, on the CPU) for every image of ``x``."""
    return run_in_batches(module.eval().cpu(), x.cpu(), BATCH).float()


def onnx_outputs(path: Path, x: torch.Tensor) -> torch.Tensor:
    """Raw output of the ONNX model at ``path`` (onnxruntime) for every image of ``x``, fed
    at the file's fixed batch if it has one (a drop-in student of ultralytics' batch-1
    export); a file with several outputs (boxes and scores, a YOLO head's levels, alone,
    beside their decoded output or in parts) has them joined, in its order, as the teacher's
    import joins them (``join_tensors``)."""
    session = onnx_session(path)
    feed = {session.get_inputs()[0].name: x.numpy()}
    chunks = run_batched(session, feed, batch_for(x.shape[1:], BATCH))
    return torch.cat([join_tensors([torch.from_numpy(out) for out in outputs])
                      for outputs in chunks]).float()  # fmt: skip


def as_truths(detections: list[Detections]) -> list[GroundTruth]:
    """Detections taken as ground truth (fidelity: the teacher's answers are the reference)."""
    return [GroundTruth(d.boxes, d.labels) for d in detections]


def _fields(scores: MapScores) -> dict:
    return {"map_50": scores.map_50, "map_50_95": scores.map_50_95}


def _size(x: torch.Tensor) -> tuple[int, int]:
    return tuple(x.shape[-2:])


def _fidelity(teacher_out, student_out, decoding: Decoding, size: tuple[int, int]) -> MapScores:
    layout = decoding.layout
    scale = None if decoding.in_pixels else encoded_scale(layout.boxes(teacher_out))
    reference = as_truths(decoding(teacher_out, size, DETECTION_THRESHOLD, box_scale=scale))
    return mean_average_precision(decoding(student_out, size, box_scale=scale), reference,
                                  layout.num_classes)  # fmt: skip


def onnx_map_50(path: Path, data: DetectionEvalData, decoding: Decoding) -> float | None:
    """mAP@0.5 of the ONNX model at ``path`` (onnxruntime) on the eval data."""
    found = decoding(onnx_outputs(path, data.x), _size(data.x))
    return mean_average_precision(found, data.truths, decoding.layout.num_classes).map_50


def onnx_fidelity(reference: Path, candidate: Path, x: torch.Tensor,
                  decoding: Decoding) -> float | None:  # fmt: skip
    """mAP@0.5 of the ONNX ``candidate``'s detections against ``reference``'s on ``x``."""
    return _fidelity(onnx_outputs(reference, x), onnx_outputs(candidate, x), decoding,
                     _size(x)).map_50  # fmt: skip


def _head_report(decoding: Decoding) -> dict:
    layout = decoding.layout
    return {"head": layout.name, "layout": layout.describe(), "num_classes": layout.num_classes,
            "decoded_by": decoding.by}  # fmt: skip


def measure_on_data(teacher: nn.Module, student_onnx: Path, data: DetectionEvalData,
                    decoding: Decoding) -> TaskScores:  # fmt: skip
    """mAP of both on the eval data; fidelity on its images."""
    t_out, s_out = torch_outputs(teacher, data.x), onnx_outputs(student_onnx, data.x)
    k, size = decoding.layout.num_classes, _size(data.x)
    t_map = mean_average_precision(decoding(t_out, size), data.truths, k)
    s_map = mean_average_precision(decoding(s_out, size), data.truths, k)
    fidelity = _fidelity(t_out, s_out, decoding, size)
    return TaskScores(
        figure=FIGURE, teacher=t_map.map_50, student=s_map.map_50, trivial=0.0,
        trivial_what="no detection at all", agreement=fidelity.map_50,
        agreement_on="eval images: student mAP@0.5 against the teacher's detections",
        report={"detection": {**_head_report(decoding),
                              "teacher_per_class_ap_50": t_map.per_class_ap_50,
                              "student_per_class_ap_50": s_map.per_class_ap_50,
                              "fidelity_map_50": fidelity.map_50,
                              "fidelity_map_50_95": fidelity.map_50_95,
                              "measured_on": f"{len(data)} eval images; student as student.onnx "
                                             "(onnxruntime); COCOeval (pycocotools)"}},
        teacher_fields=_fields(t_map), student_fields=_fields(s_map),
        rows=[("mAP@0.5 on eval data", "map_50", "pct"),
              ("mAP@[.5:.95] on eval data", "map_50_95", "pct")],
    )  # fmt: skip


def measure_fidelity(teacher: nn.Module, student_onnx: Path, x: torch.Tensor,
                     decoding: Decoding, inputs: str) -> TaskScores:  # fmt: skip
    """The student's mAP against the teacher's detections on images ``x`` (described by
    ``inputs``; the teacher scores 1.0 against itself): the figure without eval data, and the
    only one for heads whose boxes are encoded against anchors the file does not hold, unless
    the user's --decode places them."""
    t_out, s_out = torch_outputs(teacher, x), onnx_outputs(student_onnx, x)
    fidelity = _fidelity(t_out, s_out, decoding, _size(x))
    teacher_score = None if fidelity.map_50 is None else 1.0
    return TaskScores(
        figure="fidelity mAP@0.5", teacher=teacher_score, student=fidelity.map_50, trivial=0.0,
        trivial_what="no detection at all", agreement=fidelity.map_50,
        agreement_on=f"{len(x)} {inputs}: student mAP@0.5 against the teacher's detections",
        report={"detection": {**_head_report(decoding),
                              "fidelity_map_50": fidelity.map_50,
                              "fidelity_map_50_95": fidelity.map_50_95,
                              "measured_on": f"{len(x)} {inputs}; student as student.onnx "
                                             "(onnxruntime); COCOeval"}},
        teacher_fields={"fidelity_map_50": teacher_score},
        student_fields={"fidelity_map_50": fidelity.map_50},
        rows=[(f"mAP@0.5 against the teacher's detections ({inputs})",
               "fidelity_map_50", "pct")],
    )  # fmt: skip
