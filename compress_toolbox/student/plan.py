"""The student of a run: derived from the teacher (``derive.make_student``) or picked from the
model zoo, as the run's configuration says; with its cost measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

import model_zoo
from compress_toolbox.config import CompressConfig
from compress_toolbox.errors import DaflError
from compress_toolbox.load.analysis import Analysis, analyse
from compress_toolbox.load.teacher import Teacher
from compress_toolbox.student.derive import (
    ChannelOrderError,
    StudentError,
    answers_kept,
    make_student,
    start_fresh,
)
from compress_toolbox.student.graph_facts import channels_last_flatten
from compress_toolbox.tasks import Task


@dataclass
class StudentPlan:
    """Which student, how it was obtained, and its cost."""

    kind: str  # for the report: "derived (width 0.5, init teacher)" or "zoo:NAME"
    module: nn.Module
    analysis: Analysis
    source: Literal["derived", "zoo"]
    from_teacher: bool = False  # starts from the teacher's weights (fine-tuning)


def plan_student(teacher: Teacher, config: CompressConfig) -> StudentPlan:
    """The student ``config.student`` asks for: ``auto`` derives one by shrinking the teacher's
    widths, ``zoo`` picks the zoo model of the task whose cost is nearest a quarter of the
    teacher's, ``zoo:NAME`` builds that one. Its output must be the teacher's."""
    choice, from_teacher = config.student.student, False
    if choice == "auto":
        kind, module, from_teacher = _derived(teacher, config)
    elif choice == "zoo":
        try:
            name, module = model_zoo.pick_student(config.task, teacher)
        except ValueError as error:
            raise DaflError(f"--student zoo: {error}") from None
        kind = f"zoo:{name}"
    elif choice.startswith("zoo:"):
        kind, module = choice, _named_zoo_model(teacher, config.task, choice)
    else:
        raise DaflError(f"--student {choice!r}: expected auto, zoo or zoo:NAME")
    module.eval()
    analysis = analyse(module, teacher.input_shape)
    if analysis.output_shape != teacher.analysis.output_shape:
        raise DaflError(
            f"student output {analysis.output_shape} does not match the teacher's "
            f"{teacher.analysis.output_shape}"
        )
    larger = analysis.not_smaller_than(teacher.analysis)
    if choice.startswith("zoo:") and larger:  # --student zoo picks only smaller ones
        sizes = ", ".join(f"{mine:,} {what} against the teacher's {theirs:,}"
                          for what, theirs, mine in larger)  # fmt: skip
        raise DaflError(f"--student {choice} is no smaller than the teacher ({sizes}): "
                        "--student zoo picks a smaller one where the zoo has it")
    source = "derived" if choice == "auto" else "zoo"
    return StudentPlan(kind, module, analysis, source, from_teacher=from_teacher)


def teacher_weights_fit(teacher: Teacher) -> bool:
    """Whether a derived student could keep the teacher's weights (``--init teacher``): not
    where the teacher flattens H,W,C-ordered features of a size not fixed
    (``channels_last_flatten``)."""
    example = torch.randn(2, *teacher.input_shape)
    return channels_last_flatten(teacher.module, example) is None


def _derived(teacher: Teacher, config: CompressConfig) -> tuple[str, nn.Module, bool]:
    """``_derive``, its refusal completed with what can help this teacher."""
    try:
        return _derive(teacher, config)
    except ChannelOrderError:
        raise  # its message names the one fix: --init fresh
    except StudentError as error:
        raise StudentError(f"{error}; {_instead_of_deriving(teacher, config.task)}") from error


def zoo_student_for(teacher: Teacher, task: Task) -> str | None:
    """The zoo model ``--student zoo`` would take for ``teacher``, where it gives the teacher's
    output; None where none does (never advice that cannot help, as ``--student zoo`` for a
    detector whose output no zoo model gives)."""
    try:
        name, module = model_zoo.pick_student(task, teacher)
        fits = analyse(module, teacher.input_shape).output_shape == teacher.analysis.output_shape
    except Exception:  # noqa: BLE001 - no zoo model, or one that does not run: none fits
        return None
    return name if fits else None


def _instead_of_deriving(teacher: Teacher, task: Task) -> str:
    """A zoo model where one of the task gives the teacher's output, else what may help."""
    name = zoo_student_for(teacher, task)
    if name is None:
        return (f"no {task.name} model of the zoo gives this teacher's output "
                f"{tuple(teacher.analysis.output_shape)} either: try another --width, or rerun "
                "with --debug and report the traceback with the model's architecture")  # fmt: skip
    return f"pick one from the zoo instead (--student zoo would take {name})"


def _derive(teacher: Teacher, config: CompressConfig) -> tuple[str, nn.Module, bool]:
    """The teacher with every width scaled by ``--width``: (kind, module, whether it starts from
    the teacher's weights). When ``--init auto`` chose the
    teacher's weights and they cannot be kept (an H,W,C flatten, see
    ``graph_facts.channels_last_flatten``), the student starts fresh instead and its kind says
    so."""
    width, init, note = config.student.width, config.init, ""
    example = torch.randn(2, *teacher.input_shape)
    try:
        module = make_student(teacher.module, width=width, init=init, example_input=example)
    except ChannelOrderError:
        if not config.init_may_fall_back or init != "teacher":
            raise
        init, note = "fresh", ", not from the teacher's weights: H,W,C flatten"
        module = make_student(teacher.module, width=width, init=init, example_input=example)
    kept = _answers_kept(teacher, module, config, init)
    if kept is not None and kept < config.task.min_answers_kept:
        init = "fresh"
        note = f", not from the teacher's weights: they keep {kept:.2f} of its answers"
        start_fresh(module, example)  # the same pruned layers: no second derivation
    kind = f"derived (width {width}, init {init}{note})"
    if _batchnorms(module) > _batchnorms(teacher.module):
        kind += f", {_batchnorms(module)} BatchNorm layers added for training"
    return kind, module, init == "teacher"


def _answers_kept(teacher: Teacher, module: nn.Module, config: CompressConfig,
                  init: str) -> float | None:  # fmt: skip
    """What a student from the teacher's weights keeps of the teacher's answers, where
    ``--init auto`` may start it fresh instead (the task sets a minimum and the student has no
    BatchNorm: a folded teacher's); else None."""
    if (init != "teacher" or not config.init_may_fall_back or _batchnorms(module)
            or config.task.min_answers_kept is None):  # fmt: skip
        return None
    return answers_kept(teacher.module, module, tuple(teacher.input_shape))


def _named_zoo_model(teacher: Teacher, task: Task, choice: str) -> nn.Module:
    """``zoo:NAME`` built for the teacher's input and what the task asks (its classes; a
    detector's head); DaflError when unknown or it does not fit."""
    name, shape = choice[4:], teacher.input_shape
    if name not in model_zoo.list_models():
        raise DaflError(f"--student {choice}: unknown zoo model; known: "
                        f"{', '.join(model_zoo.list_models(task.name))}")  # fmt: skip
    try:
        module = model_zoo.get_model(name, in_channels=shape[0],
                                     input_size=tuple(shape[1:]) or None,
                                     **task.zoo_options(teacher))  # fmt: skip
        module.eval()(torch.zeros(2, *shape))
    except Exception as error:
        raise DaflError(
            f"--student {choice}: does not fit the teacher's input {shape}: {error}"
        ) from None
    return module


def _batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
