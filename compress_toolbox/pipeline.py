"""The whole job: load -> analyse -> derive or pick student -> distill -> export -> report."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis import Analysis, analyse
from .errors import DaflError
from .teacher import Teacher, load_teacher

SUPPORTED_TASKS = ("classification",)
KNOWN_TASKS = ("classification", "segmentation", "detection")


@dataclass
class StudentPlan:
    """Which student, how it was obtained, and its cost."""

    kind: str  # "derived (width 0.5)" or "zoo:NAME"
    module: nn.Module
    analysis: Analysis


@dataclass
class CompressResult:
    out_dir: Path | None  # None for a dry run
    teacher: Teacher
    plan: StudentPlan
    report: dict[str, Any] = field(default_factory=dict)


def default_out_dir(teacher_path: str | Path) -> Path:
    """./dafl-out/<teacher file name without suffix>/"""
    return Path("dafl-out") / Path(teacher_path).name.split(".")[0]


def checkpoint_dir_for(out_dir: Path) -> Path:
    """Where --resume checkpoints live: beside the output folder, never inside it."""
    return out_dir.with_name(out_dir.name + ".checkpoint")


def plan_student(
    teacher: Teacher,
    student: str = "auto",
    *,
    task: str = "classification",
    width: float = 0.5,
    init: str = "fresh",
) -> StudentPlan:
    """``auto``: derive by halving widths; ``zoo``: pick by task; ``zoo:NAME``: that zoo model."""
    import model_zoo

    from .student import make_student

    if student == "auto":
        example = torch.randn(2, *teacher.input_shape)
        module = make_student(teacher.module, width=width, init=init, example_input=example)
        kind = f"derived (width {width}, init {init})"
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
    return StudentPlan(kind, module, analysis)


def _check_task(task: str) -> None:
    if task not in KNOWN_TASKS:
        raise DaflError(f"--task {task}: unknown task; choose one of {', '.join(KNOWN_TASKS)}")
    if task not in SUPPORTED_TASKS:
        raise DaflError(f"--task {task} is not supported yet; only classification is")


def _check_teacher_fits_task(teacher: Teacher) -> None:
    if teacher.analysis.task != "classification":
        raise DaflError(
            f"{teacher.source}: teacher output has shape (N, "
            f"{', '.join(map(str, teacher.analysis.output_shape))}); "
            "--task classification needs (N, K) logits"
        )


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


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise DaflError(
            f"{out_dir}: output folder exists and is not empty (use --force to "
            "replace it, or --out DIR)"
        )


def compress(
    teacher_path: str | Path,
    *,
    task: str = "classification",
    student: str = "auto",
    out: str | Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    width: float = 0.5,
    init: str = "fresh",
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
    **distill_options: Any,
) -> CompressResult:
    """Run the whole pipeline on a teacher file and write a verified output folder.

    ``distill_options`` go to ``distill`` (method, preset, time_budget, iters, epochs,
    batch_size, device, seed, progress, ...). The folder is written under a temporary name and
    moved into place at the end, so a failed or interrupted run leaves no output folder.
    """
    from .distill import distill, write_history_csv
    from .evaldata import evaluate, load_eval_data
    from .export import export_onnx, export_student, onnx_accuracy, onnx_latency_ms
    from .report import plot_curves, plot_samples, write_report

    out_dir = Path(out) if out is not None else default_out_dir(teacher_path)
    _check_task(task)  # before any work: an unsupported task needs no teacher loaded
    if not dry_run:
        _prepare_out_dir(out_dir, force)
    teacher = load_teacher(
        teacher_path,
        model_class=model_class,
        model_kwargs=model_kwargs,
        input_shape=input_shape,
        trust_pickle=trust_pickle,
    )
    _check_teacher_fits_task(teacher)
    data = load_eval_data(eval_data, teacher.input_shape, mean, std) if eval_data else None
    plan = plan_student(teacher, student, task=task, width=width, init=init)
    if dry_run:
        return CompressResult(None, teacher, plan)

    work_dir = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    checkpoint_dir = checkpoint_dir_for(out_dir)
    try:
        result = distill(
            teacher,
            plan.module,
            task=task,
            eval_data=data,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            history_path=work_dir / "history.csv",
            **distill_options,
        )
        write_history_csv(result.history, work_dir / "history.csv")
        exported = export_student(result.student, teacher.input_shape, work_dir, opset=opset)

        measure_dir = work_dir / ".measure"
        measure_dir.mkdir()
        teacher_onnx = (
            Path(teacher_path)
            if teacher.format == "onnx"
            else export_onnx(teacher.module, teacher.input_shape, measure_dir / "teacher.onnx")
        )
        teacher_acc = student_acc = None
        if data is not None:
            teacher_acc = evaluate(teacher.module, data)
            student_acc = onnx_accuracy(exported.onnx_path, data.x, data.y)
        agreement = _agreement(teacher.module, exported.onnx_path, data, result.generator)
        report = {
            "teacher": {
                "source": str(teacher.source),
                "format": teacher.format,
                "input_shape": list(teacher.input_shape),
                "num_outputs": teacher.num_outputs,
                "params": teacher.analysis.params,
                "macs": teacher.analysis.macs,
                "onnx_bytes": _onnx_size(teacher_onnx),
                "latency_ms": onnx_latency_ms(teacher_onnx, teacher.input_shape),
                "accuracy": teacher_acc,
                "widths": teacher.analysis.widths,
                "import_max_rel_diff": teacher.max_rel_diff,
            },
            "student": {
                "kind": plan.kind,
                "params": plan.analysis.params,
                "macs": plan.analysis.macs,
                "onnx_bytes": exported.onnx_bytes,
                "latency_ms": onnx_latency_ms(exported.onnx_path, teacher.input_shape),
                "accuracy": student_acc,
                "accuracy_measured_on": "student.onnx (onnxruntime)",
                "widths": plan.analysis.widths,
            },
            "agreement": agreement,
            "onnx_check": {
                "opset": exported.opset,
                "max_abs_diff": exported.max_abs_diff,
                "max_rel_diff": exported.max_rel_diff,
                "batches": [1, 7],
            },
            "task": task,
            "method": result.method,
            "preset": result.preset,
            "iterations": result.iterations,
            "elapsed_s": result.elapsed_s,
            "batch_size": result.batch_size,
            "device": result.device,
            "seed": distill_options.get("seed", 0),
            "stop_reason": result.stop_reason,
            "eval_data": str(eval_data) if eval_data else None,
            "versions": _versions(),
            "command": command or " ".join(sys.argv),
        }
        shutil.rmtree(measure_dir)
        write_report(report, work_dir)
        plot_curves(result.history, work_dir / "curves.png")
        plot_samples(result.generator, teacher.module, work_dir / "samples.png")
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # finished: nothing left to resume
    return CompressResult(out_dir, teacher, plan, report)


def _onnx_size(path: Path) -> int:
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


@torch.no_grad()
def _agreement(teacher: nn.Module, student_onnx: Path, data, generator) -> dict[str, Any]:
    """Top-1 agreement of student (ONNX) and teacher, on eval data or fresh generated inputs."""
    from .export import onnx_session

    if data is not None:
        x, on = data.x, "eval data"
    elif generator is not None:
        generator = generator.eval().cpu()
        x = generator(torch.randn(512, getattr(generator, "latent_dim", 100)))
        on = "512 fresh generated samples"
    else:
        return {"value": None, "on": None}
    session = onnx_session(student_onnx)
    name = session.get_inputs()[0].name
    agree = 0
    for start in range(0, len(x), 256):
        chunk = x[start : start + 256].float()
        student_top1 = session.run(None, {name: chunk.numpy()})[0].argmax(1)
        agree += int((teacher.eval().cpu()(chunk).argmax(1).numpy() == student_top1).sum())
    return {"value": agree / len(x), "on": on}
