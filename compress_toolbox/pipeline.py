"""The whole job: load -> analyse -> derive or pick student -> distill -> export -> report."""

from __future__ import annotations

import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError
from compress_toolbox.load.analysis import Analysis, analyse
from compress_toolbox.load.teacher import Teacher, load_teacher
from compress_toolbox.outdir import OutputFolder, default_out_dir
from compress_toolbox.tasks import FILE_OUTPUTS, MainOutput, check_task, get_task, task_of_output
from compress_toolbox.tasks.verdict import trivial_score

if TYPE_CHECKING:
    from compress_toolbox.distill.trainer import DistillResult
    from compress_toolbox.export.writer import ExportResult
    from compress_toolbox.tasks.evaldata import EvalData


@dataclass
class StudentPlan:
    """Which student, how it was obtained, and its cost."""

    kind: str  # "derived (width 0.5)" or "zoo:NAME"
    module: nn.Module
    analysis: Analysis
    from_teacher: bool = False  # starts from the teacher's weights (fine-tuning)


@dataclass
class CompressResult:
    out_dir: Path | None  # None for a dry run
    teacher: Teacher
    plan: StudentPlan
    report: dict[str, Any] = field(default_factory=dict)


def plan_student(
    teacher: Teacher,
    student: str = "auto",
    *,
    task: str = "classification",
    width: float = 0.5,
    init: str = "fresh",
    init_fallback: bool = False,
) -> StudentPlan:
    """``auto``: derive by halving widths; ``zoo``: pick by task; ``zoo:NAME``: that zoo model.

    ``init_fallback``: a derived student that cannot keep the teacher's weights (an H,W,C
    flatten, see ``student.channels_last_flatten``) starts fresh instead, and ``kind`` says so.
    """
    import model_zoo
    from compress_toolbox.student.derive import ChannelOrderError, make_student

    if student == "auto":
        example = torch.randn(2, *teacher.input_shape)
        note = ""
        try:
            module = make_student(teacher.module, width=width, init=init, example_input=example)
        except ChannelOrderError:
            if not init_fallback or init != "teacher":
                raise
            init, note = "fresh", ", not from the teacher's weights: H,W,C flatten"
            module = make_student(teacher.module, width=width, init=init, example_input=example)
        kind = f"derived (width {width}, init {init}{note})"
        if _batchnorms(module) > _batchnorms(teacher.module):
            kind += f", {_batchnorms(module)} BatchNorm layers added for training"
    elif student == "zoo":
        try:
            name, module = model_zoo.pick_student(task, teacher)
        except ValueError as error:
            raise DaflError(f"--student zoo: {error}") from None
        kind = f"zoo:{name}"
    elif student.startswith("zoo:"):
        name = student[4:]
        if name not in model_zoo.list_models():
            raise DaflError(
                f"--student {student}: unknown zoo model; known: "
                f"{', '.join(model_zoo.list_models(task))}"
            )
        shape = teacher.input_shape
        try:
            module = model_zoo.get_model(
                name,
                num_classes=teacher.num_outputs,
                in_channels=shape[0],
                input_size=tuple(shape[1:]) or None,
            )
            module.eval()(torch.zeros(2, *shape))
        except Exception as error:
            raise DaflError(
                f"--student {student}: does not fit the teacher's input {shape}: {error}"
            ) from None
        kind = student
    else:
        raise DaflError(f"--student {student!r}: expected auto, zoo or zoo:NAME")
    module.eval()
    analysis = analyse(module, teacher.input_shape)
    if analysis.output_shape != teacher.analysis.output_shape:
        raise DaflError(
            f"student output {analysis.output_shape} does not match the teacher's "
            f"{teacher.analysis.output_shape}"
        )
    return StudentPlan(kind, module, analysis, from_teacher=student == "auto" and init == "teacher")


def _batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _check_teacher_fits_task(teacher: Teacher, task: str) -> None:
    """A clear refusal when the teacher's output does not fit ``--task``, naming the task it
    fits; a teacher returning a dict (``{"out": ...}``) or tuple is made to return its main
    tensor."""
    expected = get_task(task)
    shape = teacher.analysis.output_shape
    if not expected.fits(shape):
        other = task_of_output(shape)
        hint = f" (it looks like a {other} teacher: use --task {other})" if other else ""
        raise DaflError(
            f"{teacher.source}: teacher output has shape (N, {', '.join(map(str, shape))}); "
            f"--task {task} needs {expected.output_text}{hint}"
        )
    with torch.no_grad():
        out = teacher.module(torch.zeros(1, *teacher.input_shape))
    if not isinstance(out, torch.Tensor):
        teacher.module = MainOutput(teacher.module).eval()


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch_pruning
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_pruning": torch_pruning.__version__,
    }


@dataclass
class _Inputs:
    """What the run works on, loaded and checked."""

    teacher: Teacher
    domain: InputDomain
    data: EvalData | None
    plan: StudentPlan


def _load_inputs(teacher_path, *, task, student, width, init, init_fallback, eval_data, mean,
                 std, teacher_options: dict[str, Any]) -> _Inputs:  # fmt: skip
    from compress_toolbox.tasks.evaldata import load_eval_data

    teacher = load_teacher(teacher_path, **teacher_options)
    _check_teacher_fits_task(teacher, task)
    domain = InputDomain.from_options(mean, std, teacher.input_shape)
    data = None
    if eval_data:
        data = load_eval_data(eval_data, teacher.input_shape, domain, teacher.num_outputs,
                              task=task)  # fmt: skip
    plan = plan_student(teacher, student, task=task, width=width, init=init,
                        init_fallback=init_fallback)  # fmt: skip
    return _Inputs(teacher, domain, data, plan)


def compress(
    teacher_path: str | Path,
    *,
    task: str = "classification",
    student: str = "auto",
    out: str | Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    width: float = 0.5,
    init: str = "auto",
    opset: int | None = None,
    model_class: str | None = None,
    model_kwargs: dict | str | None = None,
    input_shape: tuple[int, ...] | str | None = None,
    trust_pickle: bool = False,
    eval_data: str | Path | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    resume: bool = False,
    command: str | None = None,
    on_iteration: Callable[[int], None] | None = None,
    **distill_options: Any,
) -> CompressResult:
    """Run the whole pipeline on a teacher file and write a verified output folder.

    ``init="auto"`` starts a derived student from the teacher's largest-L1 channels with the
    ``fast`` preset (measured far better in short budgets) and fresh with the paper presets
    (as in the paper). ``distill_options`` are ``DistillOptions`` fields (method, preset,
    time_budget, iters, epochs, batch_size, device, seed, threads, progress, ...). Every
    option is checked before any work. The output folder is locked for the run, written under
    a temporary name and moved into place at the end (outdir.py), so a failed or interrupted
    run leaves it as it was. A student that finishes far below its teacher
    (``health.judge_student``) is still written, marked failed in the report, and
    ``StudentFailed`` is raised.
    """
    from compress_toolbox.distill import distributed
    from compress_toolbox.distill.parts import Checkpointer
    from compress_toolbox.distill.trainer import CHECKPOINT_NAME, DistillOptions
    from compress_toolbox.export.writer import check_opset
    from compress_toolbox.load.importers.checkpoint import model_class_file

    check_task(task)
    options = DistillOptions(task=task, **distill_options)
    if options.batch_size is None:
        options.batch_size = get_task(task).batch_size
    preset = options.validate()
    if init not in ("auto", "fresh", "teacher"):
        raise DaflError(f"--init {init!r}: expected auto, fresh or teacher")
    init_fallback = init == "auto"  # the preset's choice may give way; the user's may not
    if init == "auto":
        init = get_task(task).student_init or preset.student_init
    check_opset(opset)
    InputDomain.from_options(mean, std)  # values checked now, channels once the teacher is known
    teacher_options = {"model_class": model_class, "model_kwargs": model_kwargs,
                       "input_shape": input_shape, "trust_pickle": trust_pickle}  # fmt: skip
    loading = {"task": task, "student": student, "width": width, "init": init,
               "init_fallback": init_fallback,
               "eval_data": eval_data, "mean": mean, "std": std,
               "teacher_options": teacher_options}  # fmt: skip
    world = distributed.init_from_env(options.device)  # under torchrun: join the others
    if dry_run or not world.is_writer:  # other ranks train with rank 0, which alone writes
        if not dry_run:  # and alone evaluates: the other machines need only the teacher
            loading["eval_data"] = None
        inputs = _load_inputs(teacher_path, **loading)
        if not dry_run:
            _distill(inputs, options, None, None, resume, on_iteration)
        return CompressResult(None, inputs.teacher, inputs.plan)
    folder = OutputFolder(out if out is not None else default_out_dir(teacher_path), force=force,
                          inputs=(teacher_path, eval_data, model_class_file(model_class)))
    folder.check()
    with folder:
        start = time.perf_counter()
        inputs = _load_inputs(teacher_path, **loading)
        timings = {"load_verify_plan_s": time.perf_counter() - start}
        start = time.perf_counter()
        result = _distill(inputs, options, folder.checkpoint_dir, folder.work / "history.csv",
                          resume, on_iteration)  # fmt: skip
        timings["distill_s"] = time.perf_counter() - start  # training + its set-up
        report = _write_outputs(folder.work, inputs, result, opset=opset, seed=options.seed,
                                eval_data=eval_data, task=task, command=command,
                                timings=timings)  # fmt: skip
        out_dir = folder.commit()
    if report["problems"]:  # the checkpoint stays: a failed run may --resume
        from compress_toolbox.distill.health import StudentFailed

        raise StudentFailed(
            f"the student failed: {'; '.join(report['problems'])}. The folder {out_dir} is kept "
            "for inspection (report.md, curves.png, samples.png); try a longer --time-budget, "
            "another --method or --student zoo"
        )
    Checkpointer.remove(folder.checkpoint_dir / CHECKPOINT_NAME)  # finished: nothing to resume
    return CompressResult(out_dir, inputs.teacher, inputs.plan, report)


def _distill(inputs: _Inputs, options, checkpoint_dir: Path | None, history: Path | None,
             resume: bool, on_iteration) -> DistillResult:  # fmt: skip
    """Train the planned student (on every rank; only rank 0 has a checkpoint folder). A rank
    restarted by ``torchrun --max-restarts`` resumes from rank 0's checkpoint when there is one."""
    from compress_toolbox.distill import distributed
    from compress_toolbox.distill.trainer import CHECKPOINT_NAME, distill

    if distributed.restarted() and checkpoint_dir is not None:
        resume = resume or (checkpoint_dir / CHECKPOINT_NAME).is_file()
    resume = distributed.world().broadcast_object(resume)  # rank 0 knows the checkpoint
    data = inputs.data
    return distill(
        inputs.teacher,
        inputs.plan.module,
        replace(options, domain=inputs.domain, checkpoint_dir=checkpoint_dir, resume=resume,
                history_path=history, fine_tune=inputs.plan.from_teacher),  # fmt: skip
        # the curve in training on a subset; the full evaluation below, on student.onnx
        eval_data=data.subset(get_task(options.task).monitor_samples) if data else None,
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


def _as_shipped(student: nn.Module, teacher: Teacher) -> nn.Module:
    """The student as the user's file answers: given back the Softmax or Sigmoid that the
    teacher's file ended in (distillation ran on the logits before it)."""
    as_file = FILE_OUTPUTS.get(teacher.details.get("distilled_output"))
    return as_file(student) if as_file else student


def _write_outputs(work: Path, inputs: _Inputs, result: DistillResult, *, opset, seed,
                   eval_data, task, command, timings: dict[str, float]) -> dict[str, Any]:
    """Export and verify the student, measure both models, write report and pictures."""
    from compress_toolbox.distill.trainer import write_history_csv
    from compress_toolbox.export.writer import export_student
    from compress_toolbox.report.render import (
        plot_curves,
        plot_samples,
        plot_segmentation_samples,
        write_report,
    )

    write_history_csv(result.history, work / "history.csv")
    start = time.perf_counter()
    exported = export_student(_as_shipped(result.student, inputs.teacher),
                              inputs.teacher.input_shape, work, opset=opset)  # fmt: skip
    timings["export_verify_s"] = time.perf_counter() - start
    start = time.perf_counter()
    measured = _measure(inputs, result, exported.onnx_path, work / ".measure")
    timings["measure_s"] = time.perf_counter() - start  # accuracy, agreement, latency, sizes
    report = _report(inputs, result, exported, measured, seed=seed, eval_data=eval_data,
                     task=task, command=command)  # fmt: skip
    start = time.perf_counter()
    plot_curves(result.history, work / "curves.png")
    if task == "segmentation":
        plot_segmentation_samples(result.sampler, inputs.teacher.module, result.student,
                                  inputs.domain, work / "samples.png")  # fmt: skip
    else:
        plot_samples(result.sampler, inputs.teacher.module, inputs.domain, work / "samples.png")
    timings["plots_s"] = time.perf_counter() - start
    report["timings"] = {key: round(value, 2) for key, value in timings.items()}
    write_report(report, work)
    return report


def _measure(inputs: _Inputs, result: DistillResult, student_onnx: Path,
             scratch: Path) -> _Measurements:  # fmt: skip
    """Sizes and latencies of both models; accuracies on the eval data (the student as
    student.onnx), or agreement on fresh generated inputs without it."""
    from compress_toolbox.export.writer import (
        LEGACY_OPSET,
        export_onnx,
        onnx_latency_ms,
        onnx_predictions,
    )
    from compress_toolbox.tasks.evaldata import accuracy, predict

    teacher, data = inputs.teacher, inputs.data
    scratch.mkdir()
    try:
        if teacher.format == "onnx":
            teacher_onnx = teacher.source
        else:  # measured only (size, latency): the legacy exporter is ~30x faster than dynamo
            teacher_onnx = export_onnx(teacher.module, teacher.input_shape,
                                       scratch / "teacher.onnx", opset=LEGACY_OPSET,
                                       what="the teacher (to measure it)")  # fmt: skip
    except DaflError:
        teacher_onnx = None  # reported as n/a: a measurement never fails the run
    measured = _Measurements(
        teacher_onnx_bytes=_onnx_size(teacher_onnx) if teacher_onnx else None,
        teacher_latency_ms=onnx_latency_ms(teacher_onnx, teacher.input_shape)
        if teacher_onnx
        else None,
        student_latency_ms=onnx_latency_ms(student_onnx, teacher.input_shape),
    )
    shutil.rmtree(scratch)
    if data is not None:
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
        x = result.sampler(512)
        with torch.no_grad():
            teacher_pred = teacher.module.eval()(x).argmax(1)
        measured.agreement = accuracy(onnx_predictions(student_onnx, x), teacher_pred)
        measured.agreement_on = "512 fresh generated inputs"
    return measured


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
    return [f"compression failed: the student has {s:,} {name}, the teacher {t:,} "
            f"(ratio {s / t:.2f})" for name, t, s in pairs if t and s is not None and s >= t]


def _segmentation_scores(teacher_pred: torch.Tensor, student_pred: torch.Tensor,
                         masks: torch.Tensor, num_classes: int) -> dict[str, Any]:  # fmt: skip
    """Mean IoU, pixel accuracy and per-class IoU of teacher and student on the masks."""
    from compress_toolbox.tasks.segmetrics import IGNORE_INDEX, score_masks

    scores = {name: asdict(score_masks(pred, masks, num_classes))
              for name, pred in (("teacher", teacher_pred), ("student", student_pred))}  # fmt: skip
    return {**scores, "num_classes": num_classes, "ignore_index": IGNORE_INDEX}


def _report(inputs: _Inputs, result: DistillResult, exported: ExportResult,
            measured: _Measurements, *, seed, eval_data, task, command) -> dict[str, Any]:
    """report.json's content: status and problems first, then both models, the run, versions."""
    from compress_toolbox.distill.health import judge_student

    teacher, plan = inputs.teacher, inputs.plan
    t_score, s_score = measured.teacher_accuracy, measured.student_accuracy
    seg, figure = measured.segmentation, "accuracy"
    if seg is not None:  # a student segmenting only the background keeps a high pixel accuracy
        t_score, s_score = seg["teacher"]["mean_iou"], seg["student"]["mean_iou"]
        figure = "mean IoU"
    problems = judge_student(t_score, s_score, result.health, result.num_classes, figure,
                             trivial=measured.trivial)  # fmt: skip
    problems += _compression_problems(teacher, plan, exported, measured)
    return {
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
        "trivial_predictor": {"figure": figure, "value": measured.trivial,
                              "what": "the majority class of the eval data (at least 1/K)"
                              + (", on every pixel" if seg else "")} if eval_data else None,
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
        "task": task,
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
        "seed": seed,
        "stop_reason": result.stop_reason,
        "eval_data": str(eval_data) if eval_data else None,
        "versions": _versions(),
        "command": command or " ".join(sys.argv),
    }


def _onnx_size(path: Path) -> int:
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)
