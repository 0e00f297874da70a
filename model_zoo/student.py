"""Choose a zoo student for a teacher: the model whose cost is closest to 1/4 of the teacher's."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compress_toolbox.tasks import registered_task, task_names

from .registry import get_model, list_models

# Half the width of every layer costs about a quarter of the multiply-accumulates.
COST_RATIO = 0.25


def _expected_output(task: str, num_outputs: int, input_shape: tuple[int, ...]) -> tuple | None:
    spec = registered_task(task)
    return spec.output_shape(num_outputs, input_shape) if spec else None


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


def pick_student(task: str, teacher: Any, *, exclude: Iterable[str] = ()) -> tuple[str, nn.Module]:
    """Build every zoo model of ``task`` for ``teacher`` and return the best-sized one.

    ``teacher`` needs ``input_shape`` ((C, H, W), or (features,) for classification),
    ``num_outputs`` and ``analysis`` with
    ``macs`` (and ``params``). Candidates are measured with
    ``compress_toolbox.load.analysis.analyse`` at the teacher's input shape; the one whose MACs
    are closest in log ratio to ``COST_RATIO`` x the teacher's wins; models not smaller than
    the teacher (in MACs or in parameters) are never picked. Models whose MACs
    cannot be measured (e.g. detectors returning dicts) are compared by parameter count
    against ``COST_RATIO`` x the teacher's parameters instead. Models that fail to build,
    run, or give the wrong output shape are skipped.
    """
    from compress_toolbox.load.analysis import analyse, count_params  # lazy: avoid import cycles

    if task not in task_names():
        raise ValueError(f"unknown task {task!r}; expected one of: {', '.join(task_names())}")
    input_shape = tuple(int(d) for d in teacher.input_shape)
    if len(input_shape) == 3:
        in_channels, input_size = input_shape[0], input_shape[1:]
    elif len(input_shape) == 1 and getattr(registered_task(task), "flat_inputs", False):
        # Flat feature vectors: only models that flatten their input (the MLPs) will run.
        in_channels, input_size = 1, (1, input_shape[0])
    else:
        raise ValueError(f"teacher input_shape must be (C, H, W) for {task}, got {input_shape}")
    num_outputs = int(teacher.num_outputs)
    teacher_macs = int(getattr(teacher.analysis, "macs", 0) or 0)
    teacher_params = int(getattr(teacher.analysis, "params", 0) or 0)
    expected = _expected_output(task, num_outputs, input_shape)
    excluded = set(exclude)

    best: tuple[float, str, nn.Module] | None = None
    skipped: dict[str, str] = {}
    for name in list_models(task):
        if name in excluded:
            continue
        try:
            model = get_model(
                name,
                num_classes=num_outputs,
                in_channels=in_channels,
                input_size=input_size,
            )
        except Exception as exc:
            skipped[name] = f"build failed: {exc}"
            continue
        try:
            analysis = analyse(model, input_shape)
        except Exception as exc:
            analysis = None
            if not _runs(model, input_shape):
                skipped[name] = f"forward failed: {exc}"
                continue
        if analysis is not None and expected is not None and analysis.output_shape != expected:
            skipped[name] = f"output shape {analysis.output_shape} != {expected}"
            continue
        if analysis is not None and analysis.macs > 0 and teacher_macs > 0:
            cost, target = analysis.macs, teacher_macs * COST_RATIO
        elif teacher_params > 0:
            cost, target = count_params(model), teacher_params * COST_RATIO
        else:
            skipped[name] = "neither MACs nor parameters of the teacher are known"
            continue
        params = count_params(model)
        if cost >= target / COST_RATIO or (teacher_params and params >= teacher_params):
            # a "student" must be smaller than its teacher in cost and in parameters (the
            # file's size follows them): a LeNet-5 half has 1.5x the params of a slim OCR net
            skipped[name] = "not smaller than the teacher"
            continue
        distance = abs(math.log(max(cost, 1) / target))
        if best is None or distance < best[0]:
            best = (distance, name, model)

    if best is None:
        details = "; ".join(f"{n}: {why}" for n, why in skipped.items()) or "none registered"
        raise ValueError(
            f"no {task} zoo model works for input shape {input_shape} with "
            f"{num_outputs} outputs ({details})"
        )
    return best[1], best[2]
