"""The whole job, data flowing one way: load the teacher -> derive or pick the student ->
distill -> export and verify -> report. ``compress(teacher_path, config)`` runs it; each stage
is also usable alone (``load_teacher``, ``plan_student``, ``distill``, ``export_student``)."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from compress_toolbox.config import CompressConfig
from compress_toolbox.distillation import distill, distributed
from compress_toolbox.distillation.environment import check_teacher_fits
from compress_toolbox.distillation.health import StudentFailed
from compress_toolbox.distillation.options import DistillResult, resolve_device, write_history_csv
from compress_toolbox.distillation.parts import Checkpointer
from compress_toolbox.distillation.trainer import CHECKPOINT_NAME
from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError, DaflWarning
from compress_toolbox.export.int8 import quantize_step
from compress_toolbox.export.layout import take_channels_last_input
from compress_toolbox.export.onnx_inspect import fixed_batch
from compress_toolbox.export.writer import (
    export_onnx,
    export_student,
    onnx_latency_ms,
    onnx_predictions,
    verify_onnx,
)
from compress_toolbox.export.writer import teacher_onnx as as_onnx
from compress_toolbox.load.importers.base import CHANNELS_LAST
from compress_toolbox.load.importers.checkpoint import model_class_file
from compress_toolbox.load.teacher import Teacher, load_teacher
from compress_toolbox.outdir import (
    OutputFolder,
    checkpoint_dir_for,
    default_out_dir,
    holds_only_run_files,
)
from compress_toolbox.report.build import Measurements, build_report
from compress_toolbox.report.render import plot_curves, write_report
from compress_toolbox.student.plan import (
    StudentPlan,
    plan_student,
    teacher_weights_fit,
    zoo_student_for,
)
from compress_toolbox.tasks import FILE_OUTPUTS, MainOutput, Task, task_of_output
from compress_toolbox.tasks.evaldata import (
    EvalData,
    accuracy,
    class_counts,
    per_class_accuracy,
    predict,
)
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
    shape = teacher.analysis.output_shape
    if not task.fits(shape):
        other = task_of_output(shape)
        hint = f" (it looks like a {other.name} teacher: use --task {other.name})" if other else ""
        head = teacher.details.get("one_detection_head")
        if head:
            hint = (f" (its outputs {', '.join(head)} look like one detection head: use --task "
                    "detection)")  # fmt: skip
        raise DaflError(
            f"{teacher.source}: teacher output has shape (N, {', '.join(map(str, shape))}); "
            f"--task {task.name} needs {task.output_text}{hint}"
        )
    with torch.no_grad():
        out = teacher.module(torch.zeros(1, *teacher.input_shape))
    if isinstance(out, torch.Tensor):
        return teacher
    return replace(teacher, module=MainOutput(teacher.module).eval())


@dataclass(frozen=True)
class RunInputs:
    """What a run works on, loaded and checked: stages 1 and 2 (``prepare_inputs``)."""

    teacher: Teacher
    domain: InputDomain
    data: EvalData | None
    plan: StudentPlan
    config: CompressConfig  # the run's, its task bound to the teacher (``Task.bound_to``)


def load_task_teacher(teacher_path: str | Path, config: CompressConfig) -> Teacher:
    """The teacher file at ``teacher_path``, loaded with ``config``'s teacher options, its
    several outputs joined into one where the task reads them so (a detection head)."""
    options = config.teacher
    return load_teacher(teacher_path, model_class=options.model_class,
                        model_kwargs=options.model_kwargs, input_shape=options.input_shape,
                        trust_pickle=options.trust_pickle,
                        join_outputs=config.task.joins_outputs)  # fmt: skip


def prepare_inputs(teacher: Teacher, config: CompressConfig, *,
                   eval_data: bool = False) -> RunInputs:  # fmt: skip
    """The run's inputs from a loaded ``teacher`` (``load_task_teacher``): the config whose
    task reads this teacher, the teacher fitted to it, its input domain, the eval data (when
    ``eval_data`` and the config names it) and the student plan."""
    config = replace(config, task=config.task.bound_to(teacher))
    for hint in config.task.hints() if distributed.world().is_writer else ():
        warnings.warn(hint, DaflWarning, stacklevel=2)
    teacher = fit_teacher_to_task(teacher, config.task)
    check_teacher_fits(teacher, distributed.world().device(resolve_device(config.distill.device)))
    domain = InputDomain.from_options(config.teacher.mean, config.teacher.std, teacher.input_shape)
    data = None
    if eval_data and config.eval_data:
        classes = config.task.classes_of(teacher.analysis.output_shape)
        data = config.task.load_eval_data(Path(config.eval_data), teacher.input_shape, domain,
                                          classes)  # fmt: skip
    return RunInputs(teacher, domain, data, plan_student(teacher, config), config)


def _load_inputs(teacher_path: str | Path, config: CompressConfig, *, eval_data: bool) -> RunInputs:
    return prepare_inputs(load_task_teacher(teacher_path, config), config, eval_data=eval_data)


@dataclass(frozen=True)
class SavedStudent:
    """A student written by ``save_student_onnx``: onnxruntime's largest absolute difference
    from the PyTorch student, and what report.json says of its signature (None: a teacher of
    another format than ONNX, whose names are not the file's to copy)."""

    max_abs_diff: float
    exported_as: dict[str, Any] | None


def save_student_onnx(student: nn.Module, inputs: RunInputs, path: str | Path, *,
                      opset: int | None = None, shown_as: str | Path | None = None,
                      ) -> SavedStudent:  # fmt: skip
    """Write ``student`` (of ``inputs``' plan) to ``path`` as the user runs it: ONNX, the
    Softmax or Sigmoid the teacher's file ended in given back, checked against ``student``
    in onnxruntime, with the teacher file's signature (``Task.finish_export``). Messages
    name the file ``shown_as`` (default: ``path``; a temporary file's final name)."""
    shipped = _as_shipped(student, inputs.teacher)
    shape = inputs.teacher.input_shape
    export_onnx(shipped, shape, path, opset=opset)
    max_abs, _ = verify_onnx(shipped, path, shape, source=shown_as or path)
    exported_as = inputs.config.task.finish_export(Path(path), inputs.teacher)
    exported_as = _in_teacher_layout([Path(path)], inputs.teacher, exported_as, shown_as)
    return SavedStudent(max_abs, exported_as)


def _in_teacher_layout(paths: list[Path], teacher: Teacher, exported_as: dict[str, Any] | None,
                       shown_as: str | Path | None = None) -> dict[str, Any] | None:  # fmt: skip
    """The ONNX files at ``paths`` made to take images as the teacher's file does: channels
    last for a TensorFlow teacher (they were written, checked and measured channels first, as
    the modules take them); ``exported_as`` with what report.json says of that."""
    if not teacher.channels_last:
        return exported_as
    for path in paths:
        take_channels_last_input(path, teacher.input_shape, shown_as=shown_as or path.name)
    return {**(exported_as or {}), "input_layout": CHANNELS_LAST}


def _resumes_failed_run(out: Path, config: CompressConfig) -> bool:
    """Whether this is ``--resume`` of the failed run whose folder ``out`` is (its report
    written, its checkpoint kept beside it, nothing in it but what a run writes): that folder
    is replaced as with --force."""
    real = Path(os.path.realpath(out))  # a link is followed, as OutputFolder does
    checkpoint = checkpoint_dir_for(real) / CHECKPOINT_NAME
    return (config.distill.resume and (real / "report.json").is_file() and checkpoint.is_file()
            and holds_only_run_files(real))  # fmt: skip


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
        config = inputs.config
        if not config.output.dry_run:
            _distill(inputs, config, None, None, on_iteration)
        return CompressResult(None, inputs.teacher, inputs.plan)
    out = Path(config.output.out if config.output.out is not None
               else default_out_dir(teacher_path))  # fmt: skip
    folder = OutputFolder(out, force=config.output.force or _resumes_failed_run(out, config),
                          inputs=(teacher_path, config.eval_data,
                                  model_class_file(config.teacher.model_class),
                                  config.task.user_file()))  # fmt: skip
    folder.check()
    with folder:
        start = time.perf_counter()
        inputs = _load_inputs(teacher_path, config, eval_data=True)
        config = inputs.config
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
            "for inspection (report.md, curves.png, samples.png); try "
            + _what_else(inputs.plan, teacher_weights_fit(inputs.teacher),
                         zoo_student_for(inputs.teacher, config.task))  # fmt: skip
        )
    Checkpointer.remove(folder.checkpoint_dir / CHECKPOINT_NAME)  # finished: nothing to resume
    return CompressResult(out_dir, inputs.teacher, inputs.plan, report)


def _what_else(plan: StudentPlan, weights_fit: bool, zoo_student: str | None) -> str:
    """What to try after a failed student: more time, another method, and the other kind of
    student: the zoo's (``zoo_student``, where one fits) for a derived one, a derived one (from
    the teacher's weights) for the zoo's, and for a derived one started fresh the teacher's
    weights too where they fit (``weights_fit``: on the benchmark LR-ASPP a student from them
    has passed where a fresh one failed, benchmarks/RESULTS.md)."""
    options = ["a longer --time-budget", "another --method"]
    if plan.source == "zoo":
        options.append("--student auto")
    else:
        options += ["--init teacher"] * (weights_fit and not plan.from_teacher)
        options += ["--student zoo"] * (zoo_student is not None)
    return f"{', '.join(options[:-1])} or {options[-1]}"


def _distill(inputs: RunInputs, config: CompressConfig, checkpoint_dir: Path | None,
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


def _as_shipped(student: nn.Module, teacher: Teacher) -> nn.Module:
    """The student as the user's file answers: given back the Softmax or Sigmoid that the
    teacher's file ended in (distillation ran on the logits before it)."""
    as_file = FILE_OUTPUTS.get(teacher.details.get("distilled_output"))
    return as_file(student) if as_file else student


def _write_outputs(work: Path, inputs: RunInputs, result: DistillResult, config: CompressConfig,
                   timings: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """Export and verify the student, measure both models, write report and pictures."""

    write_history_csv(result.history, work / "history.csv")
    start = time.perf_counter()
    exported = export_student(_as_shipped(result.student, inputs.teacher),
                              inputs.teacher.input_shape, work,
                              opset=config.output.opset)  # fmt: skip
    exported_as = config.task.finish_export(exported.onnx_path, inputs.teacher)
    exported = replace(exported, onnx_bytes=exported.onnx_path.stat().st_size)  # as renamed
    timings["export_verify_s"] = time.perf_counter() - start
    start = time.perf_counter()
    measured = _measure(inputs, result, exported.onnx_path, work / ".measure", config.task,
                        _measuring_seconds(config.distill.time_budget))
    timings["measure_s"] = time.perf_counter() - start  # accuracy, agreement, latency, sizes
    report = build_report(inputs.teacher, inputs.domain, inputs.plan, result, exported,
                          measured, config)  # fmt: skip
    start = time.perf_counter()
    plot_curves(result.history, work / "curves.png")
    config.task.plot_samples(result.sampler, inputs.teacher.module, result.student,
                             inputs.domain, work / "samples.png")  # fmt: skip
    timings["plots_s"] = time.perf_counter() - start
    if config.quantize.mode:  # after the float student is verified (export/int8.py)
        start = time.perf_counter()
        report["int8"] = quantize_step(work, exported.onnx_path, inputs, result, config)
        timings["quantize_s"] = time.perf_counter() - start
    exported_as = _in_teacher_layout(sorted(work.glob("*.onnx")), inputs.teacher, exported_as)
    if exported_as is not None:
        report["exported_as"] = exported_as
    if inputs.teacher.channels_last:  # the file as shipped, its Transpose included
        report["student"]["onnx_bytes"] = exported.onnx_path.stat().st_size
    report["timings"] = {key: round(value, 2) for key, value in timings.items()}
    write_report(report, work)
    return report


def _measuring_seconds(time_budget: float | None) -> float:
    """What measuring may add to a run (latencies, agreement on generated inputs): a twentieth
    of the training budget, at least 4 s; the eval data, when given, is always measured whole."""
    return max(4.0, 0.05 * (time_budget or 0.0))


def _fixed_batch(path: Path) -> int | None:
    return fixed_batch(onnx.load(str(path), load_external_data=False))


def _measure(inputs: RunInputs, result: DistillResult, student_onnx: Path, scratch: Path,
             task: Task, seconds: float) -> Measurements:  # fmt: skip
    """Sizes and latencies of both models; the task's own scores (``Task.measure``), else
    accuracies on the eval data (the student as student.onnx), or agreement on fresh
    generated inputs without it (for about ``seconds``)."""
    teacher, data = inputs.teacher, inputs.data
    scratch.mkdir()
    teacher_onnx = as_onnx(teacher, scratch)  # None: reported as n/a
    # both timed at one batch: a drop-in student's fixed one, or a fixed teacher file's
    batch = _fixed_batch(student_onnx) or (teacher_onnx and _fixed_batch(teacher_onnx)) or 1
    latency = {"seconds": seconds / 4, "batch": batch}
    measured = Measurements(
        teacher_onnx_bytes=_onnx_size(teacher_onnx) if teacher_onnx else None,
        teacher_latency_ms=onnx_latency_ms(teacher_onnx, teacher.input_shape, **latency)
        if teacher_onnx
        else None,
        student_latency_ms=onnx_latency_ms(student_onnx, teacher.input_shape, **latency),
        latency_batch=batch,
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
        else:
            measured.per_class_accuracy = _per_class_scores(teacher_pred, student_pred, data.y,
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


def _segmentation_scores(teacher_pred: torch.Tensor, student_pred: torch.Tensor,
                         masks: torch.Tensor, num_classes: int) -> dict[str, Any]:  # fmt: skip
    """Mean IoU, pixel accuracy and per-class IoU of teacher and student on the masks."""
    scores = {name: asdict(score_masks(pred, masks, num_classes))
              for name, pred in (("teacher", teacher_pred), ("student", student_pred))}  # fmt: skip
    return {**scores, "num_classes": num_classes, "ignore_index": IGNORE_INDEX}


def _per_class_scores(teacher_pred: torch.Tensor, student_pred: torch.Tensor,
                      labels: torch.Tensor, num_classes: int) -> dict[str, Any]:  # fmt: skip
    """Each class's accuracy for teacher and student, and how many eval inputs it has: where
    the student loses what it loses (two confusable classes, say)."""
    return {
        "teacher": per_class_accuracy(teacher_pred, labels, num_classes),
        "student": per_class_accuracy(student_pred, labels, num_classes),
        "inputs": class_counts(labels, num_classes).tolist(),
    }


def _onnx_size(path: Path) -> int:
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)
