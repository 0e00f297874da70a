"""Choose a zoo student for a teacher: the model whose cost is closest to 1/4 of the teacher's.

Candidates are ranked by their cost estimates (``ZooEntry.estimate``, no model built), then
built and measured in that order until no remaining one could beat the best measured so far,
even if its estimate were off by ``ESTIMATE_SLACK``: usually only the chosen model is built."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress_toolbox.tasks import Task, registered_task, task_names

from .registry import ESTIMATE_SLACK, get_entry, get_model, list_models

# Half the width of every layer costs about a quarter of the multiply-accumulates.
COST_RATIO = 0.25


@dataclass(frozen=True)
class _Request:
    """What a student must fit: the teacher's input, outputs and cost."""

    task: str
    input_shape: tuple[int, ...]
    in_channels: int
    input_size: tuple[int, int]
    num_outputs: int
    macs: int  # the teacher's (0: unknown)
    params: int  # the teacher's (0: unknown)
    options: dict[str, Any]  # what the task asks of its models beside the input (``zoo_options``)
    # the output a student must give: the teacher's where known, else the task's for the
    # teacher's classes (None: not known)
    expected_output: tuple[int, ...] | None

    def cost_args(self) -> dict[str, Any]:
        return {"num_classes": self.options.get("num_classes", self.num_outputs),
                "in_channels": self.in_channels, "input_size": self.input_size}  # fmt: skip

    def build_args(self) -> dict[str, Any]:
        return {**self.cost_args(), **self.options}


def _request(task: str, spec: Task | None, teacher: Any) -> _Request:
    """What ``teacher`` asks of a zoo student of ``task`` (``spec``: the task, bound to the
    teacher where the caller has it; None for a planned task)."""
    input_shape = tuple(int(d) for d in teacher.input_shape)
    if len(input_shape) == 3:
        in_channels, input_size = input_shape[0], input_shape[1:]
    elif len(input_shape) == 1 and getattr(spec, "flat_inputs", False):
        # Flat feature vectors: only models that flatten their input (the MLPs) will run.
        in_channels, input_size = 1, (1, input_shape[0])
    else:
        raise ValueError(f"teacher input_shape must be (C, H, W) for {task}, got {input_shape}")
    expected = getattr(teacher.analysis, "output_shape", None)
    if expected is None and spec is not None:
        expected = spec.output_shape(int(teacher.num_outputs), input_shape)
    return _Request(task, input_shape, in_channels, tuple(input_size),
                    int(teacher.num_outputs), int(getattr(teacher.analysis, "macs", 0) or 0),
                    int(getattr(teacher.analysis, "params", 0) or 0),
                    spec.zoo_options(teacher) if spec else {},
                    tuple(expected) if expected is not None else None)  # fmt: skip


def _cost_and_target(macs: int | None, params: int, request: _Request) -> tuple[int, float]:
    """(the candidate's cost, the target cost): MACs when both are known, else parameters;
    ValueError when the teacher's cost is unknown."""
    if macs and request.macs > 0:
        return macs, request.macs * COST_RATIO
    if request.params > 0:
        return params, request.params * COST_RATIO
    raise ValueError("neither MACs nor parameters of the teacher are known")


def _distance(macs: int | None, params: int, request: _Request, slack: float = 1.0) -> float:
    """Log distance of the cost to the target; ValueError when not smaller than the teacher
    (in cost or in parameters) even if the figures were ``slack`` times too high."""
    cost, target = _cost_and_target(macs, params, request)
    if cost >= slack * target / COST_RATIO or (request.params and params >= slack * request.params):
        # a "student" must be smaller than its teacher in cost and in parameters (the
        # file's size follows them): a LeNet-5 half has 1.5x the params of a slim OCR net
        raise ValueError("not smaller than the teacher")
    return abs(math.log(max(cost, 1) / target))


def _ranked(names: list[str], request: _Request, skipped: dict[str, str]) -> list[tuple]:
    """(estimated distance, name) of the candidates worth building, nearest first."""
    ranked = []
    for name in names:
        try:
            estimate = get_entry(name).estimate(**request.cost_args())
            distance = _distance(estimate.macs, estimate.params, request, ESTIMATE_SLACK)
        except ValueError as exc:  # e.g. an input too small for the model
            skipped[name] = f"{exc} (estimated)"
            continue
        ranked.append((distance, name))
    return sorted(ranked)


@torch.no_grad()
def _runs(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether one eval-mode forward on a single image works (list input, as detectors take)."""
    was_training = model.training
    model.eval()
    try:
        model([torch.zeros(*input_shape)])
        return True
    except Exception:
        return False
    finally:
        model.train(was_training)


def _measured(name: str, request: _Request) -> tuple[float, nn.Module]:
    """Build zoo model ``name`` for the request: (its distance to the target, the model);
    ValueError saying why it does not fit."""
    from compress_toolbox.load.analysis import analyse, count_params  # lazy: avoid import cycles

    try:
        model = get_model(name, **request.build_args())
    except Exception as exc:
        raise ValueError(f"build failed: {exc}") from exc
    try:
        analysis = analyse(model, request.input_shape)
    except Exception as exc:
        analysis = None
        if not _runs(model, request.input_shape):
            raise ValueError(f"forward failed: {exc}") from exc
    expected = request.expected_output
    if expected is not None and analysis is None:
        raise ValueError(f"its output is no tensor, the teacher's is {expected}")
    if analysis is not None and expected is not None and analysis.output_shape != expected:
        raise ValueError(f"output shape {analysis.output_shape} != {expected}")
    macs = analysis.macs if analysis is not None else None
    return _distance(macs, count_params(model), request), model


def pick_student(task: str | Task, teacher: Any, *,
                 exclude: Iterable[str] = ()) -> tuple[str, nn.Module]:  # fmt: skip
    """The zoo model of ``task`` best sized for ``teacher``: (its name, the model built for it).

    ``task`` is a task's name or the task itself as bound to the teacher (a detection task
    bound to a YOLO head asks its models for that head: ``Task.zoo_options``).
    ``teacher`` needs ``input_shape`` ((C, H, W), or (features,) for classification),
    ``num_outputs`` and ``analysis`` with ``macs`` (and ``params``). The model whose MACs,
    measured with ``compress_toolbox.load.analysis.analyse`` at the teacher's input shape, are
    closest in log ratio to ``COST_RATIO`` x the teacher's wins; models not smaller than the
    teacher (in MACs or in parameters) are never picked. Models whose MACs cannot be measured
    are compared by parameter count against ``COST_RATIO`` x the teacher's parameters instead.
    Models that fail to build, run, or give the wrong output shape are skipped. Models are
    built only while their cost estimate leaves them a chance (see the module's docstring).
    """
    name = task.name if isinstance(task, Task) else task
    if name not in task_names():
        raise ValueError(f"unknown task {name!r}; expected one of: {', '.join(task_names())}")
    spec = task if isinstance(task, Task) else registered_task(task)
    request = _request(name, spec, teacher)
    skipped: dict[str, str] = {}
    excluded = set(exclude)
    names = [model for model in list_models(name) if model not in excluded]
    best: tuple[float, str, nn.Module] | None = None
    for estimated, name in _ranked(names, request, skipped):
        if best is not None and estimated - math.log(ESTIMATE_SLACK) > best[0]:
            break  # this one, and every later one, is farther than the best even at worst
        try:
            distance, model = _measured(name, request)
        except ValueError as exc:
            skipped[name] = str(exc)
            continue
        if best is None or (distance, name) < best[:2]:
            best = (distance, name, model)
    if best is None:
        details = "; ".join(f"{n}: {why}" for n, why in skipped.items()) or "none registered"
        expected = request.expected_output
        output = f"output {expected}" if expected else f"{request.num_outputs} outputs"
        raise ValueError(f"no {request.task} zoo model works for input shape "
                         f"{request.input_shape} with {output} ({details})")  # fmt: skip
    return best[1], best[2]
