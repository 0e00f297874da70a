"""The whole job, data flowing one way: load the teacher -> derive or pick the student ->
distill -> export and verify -> report. ``compress(teacher_path, config)`` runs it; each stage
is also usable alone (``load_teacher``, ``plan_student``, ``distill``, ``export_student``)."""

from __future__ import annotations

import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
import torch_pruning
import torchvision
from torch import nn

from compress_toolbox.config import CompressConfig
from compress_toolbox.distillation import distill, distributed
from compress_toolbox.distillation.health import StudentFailed, judge_student
from compress_toolbox.distillation.options import DistillResult, write_history_csv
from compress_toolbox.distillation.parts import Checkpointer
from compress_toolbox.distillation.trainer import CHECKPOINT_NAME
from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError
from compress_toolbox.export.int8 import quantize_step
from compress_toolbox.export.writer import (
    ExportResult,
    export_student,
    onnx_latency_ms,
    onnx_predictions,
)
from compress_toolbox.export.writer import teacher_onnx as as_onnx
from compress_toolbox.load.analysis import Analysis
from compress_toolbox.load.importers.checkpoint import model_class_file
from compress_toolbox.load.teacher import Teacher, load_teacher
from compress_toolbox.outdir import OutputFolder, default_out_dir
from compress_toolbox.report.render import plot_curves, write_report
from compress_toolbox.student.plan import StudentPlan, plan_student
from compress_toolbox.tasks import FILE_OUTPUTS, MainOutput, Task, task_of_output
from compress_toolbox.tasks.base import TaskScores
from compress_toolbox.tasks.evaldata import EvalData, accuracy, predict
from compress_toolbox.tasks.segmetrics import IGNORE_INDEX, score_masks
from compress_toolbox.tasks.verdict import trivial_score


@dataclass(frozen=True)
class CompressResult:
    """What a run made: the output folder (None for a dry run), the teacher as loaded, the
    student plan, and report.json's content."""

    out_dir: Path | None
    teacher: Teacher
    plan: StudentPlan
    report: dict[str, Any] = field(default_factory=dict)


def fit_teacher_to_task(teacher: Teacher, task: Task) -> Teacher:
    """The teacher, checked against ``task`` (a clear refusal naming the task its output fits
    when it does not); a teacher returning a dict (``{"out": ...}``) or tuple comes back as a
    new Teacher returning its main tensor."""
    task.check_teacher(teacher)
    shape = teacher.analysis.output_shape
    if not task.fits(shape):
        other = task_of_output(shape)
        hint = f" (it looks like a {other.name} teacher: use --task {other.name})" if other else ""
        raise DaflError(
            f"{teacher.source}: teacher output has shape (N, {', '.join(map(str, shape))}); "
            f"--task {task.name} needs {task.output_text}{hint}"
        )
    with torch.no_grad():
        out = teacher.module(torch.zeros(1, *teacher.input_shape))
    if isinstance(out, torch.Tensor):
        return teacher
    return replace(teacher, module=MainOutput(teacher.module).eval())


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_pruning": torch_pruning.__version__,
    }


@dataclass(frozen=True)
class _Inputs:
    """What the run works on, loaded and checked."""

    teacher: Teacher
    domain: InputDomain
    data: EvalData | None
    plan: StudentPlan


def _load_inputs(teacher_path: str | Path, config: CompressConfig, *, eval_data: bool) -> _Inputs:
    """The teacher (fitted to the task), its input domain, the eval data (when asked) and the
    student plan."""
    options = config.teacher
    teacher = load_teacher(teacher_path, model_class=options.model_class,
                           model_kwargs=options.model_kwargs, input_shape=options.input_shape,
                           trust_pickle=options.trust_pickle)  # fmt: skip
    teacher = fit_teacher_to_task(teacher, config.task)
    domain = InputDomain.from_options(options.mean, options.std, teacher.input_shape)
    data = None
    if eval_data and config.eval_data:
        classes = config.task.classes_of(teacher.analysis.output_shape)
        data = config.task.load_eval_data(Path(config.eval_data), teacher.input_shape, domain,
                                          classes)  # fmt: skip
    return _Inputs(teacher, domain, data, plan_student(teacher, config))


def compress(teacher_path: str | Path, config: CompressConfig | None = None, *,
             on_iteration: Callable[[int], None] | None = None) -> CompressResult:  # fmt: skip
    """Run the whole pipeline on a teacher file and write a verified output folder.

    ``config`` (a ``CompressConfig``, checked when it was built) says how; the default one
    derives a half-width student and distils it with the fast preset. The output folder is
    locked for the run, written under a temporary name and moved into place at the end
    (outdir.py), so a failed or interrupted run leaves it as it was. A student that finishes
    far below its teacher (``health.judge_student``) is still written, marked failed in the
    report, and ``StudentFailed`` is raised. ``on_iteration`` is called after each training
    iteration with its number.
    """
    config = config or CompressConfig()
    world = distributed.init_from_env(config.distill.device)  # under torchrun: join the others
    if config.output.dry_run or not world.is_writer:
        # other ranks train with rank 0, which alone writes and evaluates
        inputs = _load_inputs(teacher_path, config, eval_data=config.output.dry_run)
        if not config.output.dry_run:
            _distill(inputs, config, None, None, on_iteration)
        return CompressResult(None, inputs.teacher, inputs.plan)
    out = config.output.out
    folder = OutputFolder(out if out is not None else default_out_dir(teacher_path),
                          force=config.output.force,
                          inputs=(teacher_path, config.eval_data,
                                  model_class_file(config.teacher.model_class)))  # fmt: skip
    folder.check()
    with folder:
        start = time.perf_counter()
        inputs = _load_inputs(teacher_path, config, eval_data=True)
        timings = {"load_verify_plan_s": time.perf_counter() - start}
        start = time.perf_counter()
        result = _distill(inputs, config, folder.checkpoint_dir, folder.work / "history.csv",
                          on_iteration)  # fmt: skip
        timings["distill_s"] = time.perf_counter() - start  # training + its set-up
        report = _write_outputs(folder.work, inputs, result, config, timings)
        out_dir = folder.commit()
    if report["problems"]:  # the checkpoint stays: a failed run may --resume
        raise StudentFailed(
            f"the student failed: {'; '.join(report['problems'])}. The folder {out_dir} is kept "
            "for inspection (report.md, curves.png, samples.png); try a longer --time-budget, "
            "another --method or --student zoo"
        )
    Checkpointer.remove(folder.checkpoint_dir / CHECKPOINT_NAME)  # finished: nothing to resume
    return CompressResult(out_dir, inputs.teacher, inputs.plan, report)


def _distill(inputs: _Inputs, config: CompressConfig, checkpoint_dir: Path | None,
             history: Path | None, on_iteration) -> DistillResult:  # fmt: skip
    """Train the planned student (on every rank; only rank 0 has a checkpoint folder). A rank
    restarted by ``torchrun --max-restarts`` resumes from rank 0's checkpoint when there is one."""
    resume = config.distill.resume
    if distributed.restarted() and checkpoint_dir is not None:
        resume = resume or (checkpoint_dir / CHECKPOINT_NAME).is_file()
    resume = distributed.world().broadcast_object(resume)  # rank 0 knows the checkpoint
    data = inputs.data
    return distill(
        inputs.teacher,
        inputs.plan.module,
        replace(
            config.distill,
            domain=inputs.domain,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            history_path=history,
            fine_tune=inputs.plan.from_teacher,
        ),  # fmt: skip
        # the curve in training on a subset; the full evaluation below, on student.onnx
        eval_data=data.subset(config.task.monitor_samples)
        if data and config.task.monitor_samples
        else None,
        on_iteration=on_iteration,
    )


@dataclass
class _Measurements:
    """Both models measured as shipped (ONNX in onnxruntime)."""

    teacher_onnx_bytes: int | None  # None: the teacher could not be exported to measure it
    teacher_latency_ms: float | None
    student_latency_ms: float
    teacher_accuracy: float | None = None  # on --eval-data
    student_accuracy: float | None = None
    agreement: float | None = None  # student-teacher top-1 agreement
    agreement_on: str | None = None  # on what: "eval data" or generated inputs
    segmentation: dict[str, Any] | None = None  # mean/per-class IoU, pixel accuracy of both
    trivial: float | None = None  # the input-blind predictor's score (verdict.trivial_score)
    task_scores: TaskScores | None = None  # the task's own measurement (Task.measure)


def _as_shipped(student: nn.Module, teacher: Teacher) -> nn.Module:
    """The student as the user's file answers: given back the Softmax or Sigmoid that the
    teacher's file ended in (distillation ran on the logits before it)."""
    as_file = FILE_OUTPUTS.get(teacher.details.get("distilled_output"))
    return as_file(student) if as_file else student


def _write_outputs(work: Path, inputs: _Inputs, result: DistillResult, config: CompressConfig,
                   timings: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """Export and verify the student, measure both models, write report and pictures."""

    write_history_csv(result.history, work / "history.csv")
    start = time.perf_counter()
    exported = export_student(_as_shipped(result.student, inputs.teacher),
                              inputs.teacher.input_shape, work,
                              opset=config.output.opset)  # fmt: skip
    exported_as = config.task.finish_export(exported.onnx_path, inputs.teacher)
    timings["export_verify_s"] = time.perf_counter() - start
    start = time.perf_counter()
    measured = _measure(inputs, result, exported.onnx_path, work / ".measure", config.task,
                        _measuring_seconds(config.distill.time_budget))
    timings["measure_s"] = time.perf_counter() - start  # accuracy, agreement, latency, sizes
    report = _report(inputs, result, exported, measured, config)
    if exported_as is not None:
        report["exported_as"] = exported_as
    start = time.perf_counter()
    plot_curves(result.history, work / "curves.png")
    config.task.plot_samples(result.sampler, inputs.teacher.module, result.student,
                             inputs.domain, work / "samples.png")  # fmt: skip
    timings["plots_s"] = time.perf_counter() - start
    if config.quantize.mode:  # after the float student is verified (export/int8.py)
        start = time.perf_counter()
        report["int8"] = quantize_step(work, exported.onnx_path, inputs, result, config)
        timings["quantize_s"] = time.perf_counter() - start
    report["timings"] = {key: round(value, 2) for key, value in timings.items()}
    write_report(report, work)
    return report


def _measuring_seconds(time_budget: float | None) -> float:
    """What measuring may add to a run (latencies, agreement on generated inputs): a twentieth
    of the training budget, at least 4 s; the eval data, when given, is always measured whole."""
    return max(4.0, 0.05 * (time_budget or 0.0))


def _measure(inputs: _Inputs, result: DistillResult, student_onnx: Path, scratch: Path,
             task: Task, seconds: float) -> _Measurements:  # fmt: skip
    """Sizes and latencies of both models; the task's own scores (``Task.measure``), else
    accuracies on the eval data (the student as student.onnx), or agreement on fresh
    generated inputs without it (for about ``seconds``)."""
    teacher, data = inputs.teacher, inputs.data
    scratch.mkdir()
    teacher_onnx = as_onnx(teacher, scratch)  # None: reported as n/a
    measured = _Measurements(
        teacher_onnx_bytes=_onnx_size(teacher_onnx) if teacher_onnx else None,
        teacher_latency_ms=onnx_latency_ms(teacher_onnx, teacher.input_shape, seconds=seconds / 4)
        if teacher_onnx
        else None,
        student_latency_ms=onnx_latency_ms(student_onnx, teacher.input_shape, seconds=seconds / 4),
    )
    shutil.rmtree(scratch)
    measured.task_scores = task.measure(teacher.module, student_onnx, data, result.sampler)
    if measured.task_scores is not None:
        scores = measured.task_scores
        measured.agreement, measured.agreement_on = scores.agreement, scores.agreement_on
        measured.trivial = scores.trivial
    elif data is not None:
        teacher_pred = predict(teacher.module, data)
        student_pred = onnx_predictions(student_onnx, data.x)
        measured.teacher_accuracy = accuracy(teacher_pred, data.y)
        measured.student_accuracy = accuracy(student_pred, data.y)
        measured.agreement = accuracy(student_pred, teacher_pred)
        measured.agreement_on = "eval data"
        measured.trivial = trivial_score(data.y, teacher.num_outputs)
        if data.y.dim() > 1:  # masks: pixel accuracy above, IoU here
            measured.segmentation = _segmentation_scores(teacher_pred, student_pred, data.y,
                                                         teacher.num_outputs)  # fmt: skip
    elif result.sampler is not None:
        x, teacher_pred = _generated_with_answers(teacher.module, result.sampler, seconds)
        measured.agreement = accuracy(onnx_predictions(student_onnx, x), teacher_pred)
        measured.agreement_on = f"{len(x)} fresh generated inputs"
    return measured


def _generated_with_answers(teacher: nn.Module, sampler, seconds: float, most: int = 512,
                            least: int = 64) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Fresh generated inputs and the teacher's top-1 answers, 32 at a time, until ``most`` of
    them or ``seconds`` have passed (but at least ``least``): a large teacher on a busy CPU
    took 197 s for 512 inputs after a 60 s budget."""
    inputs, answers, start = [], [], time.perf_counter()
    while len(inputs) * 32 < most and (
        len(inputs) * 32 < least or time.perf_counter() - start < seconds
    ):
        x = sampler(32)
        with torch.no_grad():
            answers.append(teacher.eval()(x).argmax(1))
        inputs.append(x)
    return torch.cat(inputs), torch.cat(answers)


FAR_ABOVE_WIDTH_SQUARED = 0.40  # a half-width student keeps about 0.25 of the parameters


def _layers_kept_whole(teacher: Analysis, plan: StudentPlan) -> list[str] | None:
    """Why a derived student keeps far more than width^2 of the parameters: its conv/linear
    layers (the output layer aside) that kept the teacher's width. None when it did shrink."""
    shrunk = plan.analysis.params <= FAR_ABOVE_WIDTH_SQUARED * teacher.params
    if shrunk or not plan.kind.startswith("derived"):
        return None
    widths = {layer.name: layer.out_width for layer in teacher.layers[:-1]}
    return [f"{layer.name} ({layer.out_width})" for layer in plan.analysis.layers
            if widths.get(layer.name) == layer.out_width]  # fmt: skip


def _compression_problems(teacher: Teacher, plan: StudentPlan, exported: ExportResult,
                          measured: _Measurements) -> list[str]:  # fmt: skip
    """A student no smaller than its teacher in parameters, MACs or ONNX bytes failed the
    point of the run, whatever its accuracy."""
    pairs = (("parameters", teacher.analysis.params, plan.analysis.params),
             ("MACs", teacher.analysis.macs, plan.analysis.macs),
             ("ONNX bytes", measured.teacher_onnx_bytes, exported.onnx_bytes))  # fmt: skip
    return [
        f"compression failed: the student has {s:,} {name}, the teacher {t:,} (ratio {s / t:.2f})"
        for name, t, s in pairs
        if t and s is not None and s >= t
    ]


def _segmentation_scores(teacher_pred: torch.Tensor, student_pred: torch.Tensor,
                         masks: torch.Tensor, num_classes: int) -> dict[str, Any]:  # fmt: skip
    """Mean IoU, pixel accuracy and per-class IoU of teacher and student on the masks."""
    scores = {name: asdict(score_masks(pred, masks, num_classes))
              for name, pred in (("teacher", teacher_pred), ("student", student_pred))}  # fmt: skip
    return {**scores, "num_classes": num_classes, "ignore_index": IGNORE_INDEX}


def _report(
    inputs: _Inputs,
    result: DistillResult,
    exported: ExportResult,
    measured: _Measurements,
    config: CompressConfig,
) -> dict[str, Any]:
    """report.json's content: status and problems first, then both models, the run, versions."""
    eval_data, command = config.eval_data, config.output.command
    teacher, plan = inputs.teacher, inputs.plan
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
    problems += _compression_problems(teacher, plan, exported, measured)
    report = {
        "status": "failed" if problems else "ok",
        "problems": problems,
        "teacher": {
            "source": str(teacher.source),
            "format": teacher.format,
            "input_shape": list(teacher.input_shape),
            "input_domain": inputs.domain.describe(),
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
        },
        "student": {
            "kind": plan.kind,
            "params": plan.analysis.params,
            "macs": plan.analysis.macs,
            "onnx_bytes": exported.onnx_bytes,
            "latency_ms": measured.student_latency_ms,
            "accuracy": measured.student_accuracy,
            "mean_iou": seg["student"]["mean_iou"] if seg else None,
            "accuracy_measured_on": "student.onnx (onnxruntime)",
            "widths": plan.analysis.widths,
            "layers_kept_whole": _layers_kept_whole(teacher.analysis, plan),
        },
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
        "preset": result.preset,
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
        "versions": _versions(),
        "command": command or " ".join(sys.argv),
    }
    if scores is not None:
        _add_task_scores(report, scores)
    return report


def _add_task_scores(report: dict[str, Any], scores: TaskScores) -> None:
    """The task's own figures in report.json (and the rows report.md shows them in)."""
    report["teacher"].update(scores.teacher_fields)
    report["student"].update(scores.student_fields)
    report.update(scores.report)
    report["score_rows"] = [list(row) for row in scores.rows]
    if report["trivial_predictor"] is not None:
        report["trivial_predictor"].update(figure=scores.figure, value=scores.trivial,
                                           what=scores.trivial_what)  # fmt: skip


def _onnx_size(path: Path) -> int:
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)
