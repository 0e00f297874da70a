"""The optimisers a run trains with: the student's (the preset's choice) and the generators'.

On a GPU, Adam is the fused kernel: the suite's networks are small enough that launching one
kernel per parameter tensor, not the arithmetic, bounds an iteration (benchmarks/RESULTS.md,
profile_iteration.py). On the CPU it stays the default (for-each) implementation the
benchmarks were measured with.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from compress_toolbox.distillation.presets import Preset
from compress_toolbox.errors import DaflError


def adam(parameters: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0
         ) -> torch.optim.Adam:  # fmt: skip
    """Adam over ``parameters`` (already on their device), fused where they are on CUDA."""
    parameters = list(parameters)
    on_cuda = bool(parameters) and all(p.is_cuda for p in parameters)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=on_cuda or None)


def make_student_optimizer(preset: Preset, student: nn.Module, lr: float,
                           weight_decay: float) -> torch.optim.Optimizer:  # fmt: skip
    """The preset's optimiser over the student's parameters (on their device already), at the
    rates ``Preset.student_rates`` gives."""
    if preset.student_optimizer == "adam":
        return adam(student.parameters(), lr, weight_decay)
    if preset.student_optimizer == "sgd":
        return torch.optim.SGD(student.parameters(), lr=lr, momentum=preset.momentum,
                               weight_decay=weight_decay)  # fmt: skip
    raise DaflError(f"unknown student optimizer {preset.student_optimizer!r}")
