"""Segmentation: (N, K, H, W) per-pixel logits, every pixel a sample; mean IoU on --eval-data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compress_toolbox.domain import InputDomain
from compress_toolbox.tasks import register_task
from compress_toolbox.tasks.base import Task
from compress_toolbox.tasks.evaldata import EvalData
from compress_toolbox.tasks.mask_data import load_mask_data


@dataclass(frozen=True)
class Segmentation(Task):
    """(N, K, H, W) logits; masks as .npz or a folder of images beside a folder of PNGs."""

    def output_shape(self, num_outputs: int, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (num_outputs, *input_shape[1:])

    def auto_method(self, batchnorm_layers: int) -> tuple[str, str] | None:
        return "dafl-seg", (
            "per-pixel DAFL with a quarter of each student batch scenes of the teacher's "
            "objects on plain canvases: on the segmentation benchmark at 600 s (median of 3 "
            "seeds), 72.9% of the U-Net's mean IoU against 68.4% for DAFL alone with a derived "
            "student, 54.7% against 56.3% of the LR-ASPP's with a zoo student; DAFL beat "
            "bn-prior and dfad there, BatchNorm or not"
        )

    def race_candidates(self, batchnorm_layers: int) -> tuple[str, ...] | None:
        return ("dafl-seg", "dafl", "adversarial")

    def load_eval_data(self, path: Path, input_shape: tuple[int, ...], domain: InputDomain,
                       num_classes: int | None) -> EvalData:  # fmt: skip
        return load_mask_data(path, input_shape, domain, num_classes)

    def plot_samples(self, sampler, teacher: nn.Module, student: nn.Module,
                     domain: InputDomain, path: Path) -> None:  # fmt: skip
        from compress_toolbox.report.render import plot_segmentation_samples  # lazy: matplotlib

        plot_segmentation_samples(sampler, teacher, student, domain, path)


# Batch 16: 16 canvases of 64x64 are 65,536 pixel samples per batch, and more, cheaper student
# steps beat fewer large ones in a fixed budget: on the benchmark U-Net at 180 s, student mean
# IoU 50% of the teacher's at 16, 37% at 8, 24-30% at 32 (one seed each; RESULTS.md). The fast
# preset's 128 was never tried: every step 8x dearer.
# A derived student from the teacher's largest channels (BatchNorm folded) answered background
# on every pixel and stayed so on the benchmark U-Net with dafl, dfad and adversarial; fresh
# (with BatchNorm added) learned (benchmarks/RESULTS.md).
# Every canvas is H*W pixel samples: 32 generated canvases of 64x64 give the health check
# 131,072 pixels for its class histogram, and 200 evaluation canvases the curve 819,200; 256 and
# 1,000 took 1.2 s per health check (every 10 iterations) and 1.6 s per curve point, 31% of a
# 90 s run on the benchmark U-Net (RESULTS.md).
# Generated scenes moved about (shift_and_flip): the generator otherwise puts the same classes
# in the same places in every image (samples.png), and the student learns classes by position.
# Then jittered in contrast, brightness, blur and noise (photometric): the generator's images
# are black and white, real scenes are not. On the benchmark U-Net at 600 s on a quiet CPU: 47%
# of the teacher's mean IoU without (one seed), 68-72% with (three); paired 270-300 s runs on
# both teachers agree (RESULTS.md, session 7).
SEGMENTATION = register_task(
    Segmentation(
        "segmentation",
        3,
        "(N, K, H, W) per-pixel logits",
        batch_size=16,
        student_init="fresh",
        health_samples=32,
        monitor_samples=200,
        generated_augmentations=("shift_and_flip", "photometric"),
        one_class_per_input=False,
        figure="mean IoU",
    )  # fmt: skip
)
