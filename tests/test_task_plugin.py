"""Tasks are plug-ins: a task defined in one file outside the package (tests/toy_regression_task.py)
is accepted by the configuration, plans a student and distils with its own loss and method rule."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from compress_toolbox import CompressConfig, DaflError, Teacher, distill, get_task, plan_student
from compress_toolbox import tasks as task_registry
from compress_toolbox.tasks import task_names


@pytest.fixture(scope="module")
def regression():
    """The toy task, registered by importing its file, and unregistered afterwards so that the
    rest of the suite sees the built-in tasks only."""
    module = importlib.import_module("toy_regression_task")
    yield module.REGRESSION
    task_registry._TASKS.pop("regression", None)


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_task_from_one_file_runs_a_short_distillation(regression):
    torch.manual_seed(0)
    teacher = Teacher.from_module(Regressor(), (6,))
    config = CompressConfig.from_options(task="regression", iters=30, batch_size=64,
                                         progress=False, threads=1)  # fmt: skip
    assert config.task is regression and "regression" in task_names()
    plan = plan_student(teacher, config)
    assert plan.analysis.params < teacher.analysis.params
    x = torch.rand(256, 6)
    with torch.no_grad():
        before = nn.functional.mse_loss(plan.module(x), teacher.module(x)).item()
    result = distill(teacher, plan.module, config.distill)
    assert result.method == "noise" and "regression" in result.method_reason  # its own rule
    with torch.no_grad():
        after = nn.functional.mse_loss(result.student(x), teacher.module(x)).item()
    assert after < before / 2  # its own loss (MSE) taught the student the teacher's values


def test_a_task_name_is_registered_once(regression):
    with pytest.raises(ValueError, match="already registered"):
        task_registry.register_task(regression)


def test_unknown_tasks_are_refused_in_one_line_and_detection_is_registered():
    with pytest.raises(DaflError, match="unknown task"):
        get_task("captioning")
    assert CompressConfig(task="detection").task.name == "detection"
