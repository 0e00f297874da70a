"""Stage 5, report: report.json's content (``build_report``) from what the earlier stages
returned and what was measured on the shipped files (``Measurements``)."""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass
from typing import Any

import onnx
import onnxruntime
import torch
import torch_pruning
import torchvision

from compress_toolbox.config import CompressConfig
from compress_toolbox.distillation.health import judge_student
from compress_toolbox.distillation.options import DistillResult
from compress_toolbox.domain import InputDomain
from compress_toolbox.export.writer import ExportResult
from compress_toolbox.load.analysis import Analysis, not_smaller
from compress_toolbox.load.teacher import Teacher
from compress_toolbox.student.plan import StudentPlan
from compress_toolbox.tasks.base import TaskScores
from compress_toolbox.tasks.outputs import JOIN_KINDS


@dataclass
class Measurements:
    """Both models measured as shipped (ONNX in onnxruntime)."""

    teacher_onnx_bytes: int | None  # None: the teacher could not be exported to measure it
    teacher_latency_ms: float | None
    student_latency_ms: float
    latency_batch: int = 1  # both latencies at this batch (a student fixed at it: the teacher's)
    teacher_accuracy: float | None = None  # on --eval-data
    student_accuracy: float | None = None
    agreement: float | None = None  # student-teacher top-1 agreement
    agreement_on: str | None = None  # on what: "eval data" or generated inputs
    segmentation: dict[str, Any] | None = None  # mean/per-class IoU, pixel accuracy of both
    per_class_accuracy: dict[str, Any] | None = None  # labelled classes: per-class accuracy of both
    trivial: float | None = None  # the input-blind predictor's score (verdict.trivial_score)
    task_scores: TaskScores | None = None  # the task's own measurement (Task.measure)


def versions() -> dict[str, str]:
    """The versions of what made the run (report.json's "versions")."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_pruning": torch_pruning.__version__,
    }


FAR_ABOVE_WIDTH_SQUARED = 0.40  # a half-width student keeps about 0.25 of the parameters


def layers_kept_whole(teacher: Analysis, plan: StudentPlan) -> list[str] | None:
    """Why a derived student keeps far more than width^2 of the parameters: its conv/linear
    layers (the output layer aside) that kept the teacher's width. None when it did shrink."""
    shrunk = plan.analysis.params <= FAR_ABOVE_WIDTH_SQUARED * teacher.params
    if shrunk or plan.source != "derived":
        return None
    widths = {layer.name: layer.out_width for layer in teacher.layers[:-1]}
    return [f"{layer.name} ({layer.out_width})" for layer in plan.analysis.layers
            if widths.get(layer.name) == layer.out_width]  # fmt: skip


def compression_problems(teacher: Teacher, plan: StudentPlan, exported: ExportResult,
                          measured: Measurements) -> list[str]:  # fmt: skip
    """A student no smaller than its teacher in parameters, MACs or ONNX bytes failed the
    point of the run, whatever its accuracy."""
    larger = plan.analysis.not_smaller_than(teacher.analysis) + not_smaller(
        [("ONNX bytes", measured.teacher_onnx_bytes, exported.onnx_bytes)])
    return [
        f"compression failed: the student has {s:,} {name}, the teacher {t:,} (ratio {s / t:.2f})"
        for name, t, s in larger
    ]


def build_report(
    teacher: Teacher,
    domain: InputDomain,
    plan: StudentPlan,
    result: DistillResult,
    exported: ExportResult,
    measured: Measurements,
    config: CompressConfig,
) -> dict[str, Any]:
    """report.json's content: status and problems first, then both models, the run, versions."""
    eval_data, command = config.eval_data, config.output.command
    t_score, s_score = measured.teacher_accuracy, measured.student_accuracy
    seg, figure = measured.segmentation, "accuracy"
    if seg is not None:  # a student segmenting only the background keeps a high pixel accuracy
        t_score, s_score = seg["teacher"]["mean_iou"], seg["student"]["mean_iou"]
        figure = "mean IoU"
    scores = measured.task_scores
    if scores is not None:
        t_score, s_score, figure = scores.teacher, scores.student, scores.figure
    problems = judge_student(t_score, s_score, result.health, result.num_classes, figure,
                             trivial=measured.trivial)  # fmt: skip
    problems += compression_problems(teacher, plan, exported, measured)
    report = {
        "status": "failed" if problems else "ok",
        "problems": problems,
        "teacher": _teacher_section(teacher, domain, measured),
        "student": _student_section(teacher, plan, exported, measured),
        "agreement": {"value": measured.agreement, "on": measured.agreement_on},
        "trivial_predictor": {
            "figure": figure,
            "value": measured.trivial,
            "what": "the majority class of the eval data (at least 1/K)"
            + (", on every pixel" if seg else ""),
        }
        if eval_data
        else None,
        "segmentation": seg,
        "per_class_accuracy": measured.per_class_accuracy,
        "health": asdict(result.health) if result.health else None,
        "generator_restarts": result.restarts,
        "onnx_check": {
            "opset": exported.opset,
            "max_abs_diff": exported.max_abs_diff,
            "max_rel_diff": exported.max_rel_diff,
            "pt2_skipped": exported.pt2_skipped,
            "batches": [1, 7],
        },
        "task": config.task.name,
        "method": result.method,
        "method_reason": result.method_reason,
        "race": result.race.as_dict() if result.race is not None else None,
        "preset": result.preset,
        "preset_changes": result.preset_changes,  # {} when the named preset ran as it is
        "recipe": asdict(result.recipe),
        "iterations": result.iterations,
        "elapsed_s": result.elapsed_s,
        "batch_size": result.batch_size,
        "world_size": result.world_size,  # ranks; the global batch is their product
        "global_batch_size": result.batch_size * result.world_size,
        "device": result.device,
        "seed": config.distill.seed,
        "stop_reason": result.stop_reason,
        "eval_data": str(eval_data) if eval_data else None,
        "versions": versions(),
        "command": command or " ".join(sys.argv),
    }
    if scores is not None:
        _add_task_scores(report, scores)
    return report


def _teacher_section(teacher: Teacher, domain: InputDomain,
                     measured: Measurements) -> dict[str, Any]:  # fmt: skip
    """report.json's "teacher": where it came from, its cost and its scores."""
    seg = measured.segmentation
    return {
        "source": str(teacher.source),
        "format": teacher.format,
        "input_shape": list(teacher.input_shape),
        "input_domain": domain.describe(),
        "num_outputs": teacher.num_outputs,
        "params": teacher.analysis.params,
        "macs": teacher.analysis.macs,
        "onnx_bytes": measured.teacher_onnx_bytes,
        "latency_ms": measured.teacher_latency_ms,
        "accuracy": measured.teacher_accuracy,
        "mean_iou": seg["teacher"]["mean_iou"] if seg else None,
        "widths": teacher.analysis.widths,
        "import_max_rel_diff": teacher.max_rel_diff,
        "distilled_output": teacher.details.get("distilled_output", "logits"),
        **{key: teacher.details.get(key) for key in JOIN_KINDS.values()},
    }


def _student_section(teacher: Teacher, plan: StudentPlan, exported: ExportResult,
                     measured: Measurements) -> dict[str, Any]:  # fmt: skip
    """report.json's "student": what kind, its cost (of student.onnx) and its scores."""
    seg = measured.segmentation
    return {
        "kind": plan.kind,
        "params": plan.analysis.params,
        "macs": plan.analysis.macs,
        "onnx_bytes": exported.onnx_bytes,
        "latency_ms": measured.student_latency_ms,
        "latency_batch": measured.latency_batch,
        "accuracy": measured.student_accuracy,
        "mean_iou": seg["student"]["mean_iou"] if seg else None,
        "accuracy_measured_on": "student.onnx (onnxruntime)",
        "widths": plan.analysis.widths,
        "layers_kept_whole": layers_kept_whole(teacher.analysis, plan),
    }


def _add_task_scores(report: dict[str, Any], scores: TaskScores) -> None:
    """The task's own figures in report.json (and the rows report.md shows them in)."""
    report["teacher"].update(scores.teacher_fields)
    report["student"].update(scores.student_fields)
    report.update(scores.report)
    report["score_rows"] = [list(row) for row in scores.rows]
    if report["trivial_predictor"] is not None:
        report["trivial_predictor"].update(figure=scores.figure, value=scores.trivial,
                                           what=scores.trivial_what)  # fmt: skip
