"""A toy task defined outside the package, in one file: regression on (N, D) outputs, distilled
with a mean squared error. Registering it is all it takes for the pipeline to accept it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress_toolbox import Task, register_task
from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError


@dataclass(frozen=True)
class Regression(Task):
    """(N, D) real-valued outputs; no labelled data format of its own."""

    def output_shape(self, num_outputs: int, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (num_outputs,)

    def distillation_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                          temperature: float) -> torch.Tensor:  # fmt: skip
        return F.mse_loss(student_out, teacher_out)

    def auto_method(self, batchnorm_layers: int) -> tuple[str, str]:
        return "noise", "a regression teacher's outputs are not class scores for DAFL's losses"

    def load_eval_data(self, path: Path, input_shape, domain: InputDomain, num_classes):
        raise DaflError(f"{path}: the regression toy task reads no evaluation data")

    def plot_samples(self, sampler, teacher: nn.Module, student: nn.Module,
                     domain: InputDomain, path: Path) -> None:  # fmt: skip
        path.write_text("no samples for regression\n")


REGRESSION = register_task(Regression("regression", 1, "(N, D) values", one_class_per_input=False))
