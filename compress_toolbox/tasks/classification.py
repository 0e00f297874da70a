"""Classification: (N, K) logits, one class per input; accuracy on --eval-data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compress_toolbox.domain import InputDomain
from compress_toolbox.tasks import register_task
from compress_toolbox.tasks.base import Task
from compress_toolbox.tasks.evaldata import EvalData, load_label_data


@dataclass(frozen=True)
class Classification(Task):
    """(N, K) logits; labelled data as .npz, MNIST idx or an ImageFolder."""

    def output_shape(self, num_outputs: int, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (num_outputs,)

    def load_eval_data(self, path: Path, input_shape: tuple[int, ...], domain: InputDomain,
                       num_classes: int | None) -> EvalData:  # fmt: skip
        return load_label_data(path, input_shape, domain, num_classes)

    def plot_samples(self, sampler, teacher: nn.Module, student: nn.Module,
                     domain: InputDomain, path: Path) -> None:  # fmt: skip
        from compress_toolbox.report.render import plot_samples  # lazy: matplotlib

        plot_samples(sampler, teacher, domain, path)


# Generated images moved by up to 1/8 of their size and mirrored at random (the random crop and
# flip of classification training) before the teacher sees them: on a ResNet without BatchNorm
# statistics the student reached 75.9% of the teacher instead of 72.6% in 180 s (medians of 3
# seeds), the same on LeNet-5 (benchmarks/RESULTS.md, bench_suite.py).
# min_answers_kept: the suite's teachers trained without BatchNorm keep 0.51-0.94 of their
# answers in a half-width student from their weights and learn best from them; the
# BatchNorm-folded ResNets keep 0.15 and 0.04, start at chance, and learn better fresh with
# BatchNorm (resnet20-fashion 93.6% of the teacher against 88.6%, benchmarks/RESULTS.md)
CLASSIFICATION = register_task(
    Classification("classification", 1, "(N, K) logits", flat_inputs=True,
                   generated_augmentations=("crop_and_flip",), min_answers_kept=0.3)  # fmt: skip
)
