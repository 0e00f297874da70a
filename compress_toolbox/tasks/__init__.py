"""The task names and what each task means: the one place that knows them (the zoo, the
pipeline, the trainer and the CLI import them).

A task says which teacher outputs it accepts (``check_output``), how many classes they have, and
how its logits become per-sample class scores (``as_samples``): a classifier's (N, K) logits are
N samples; a segmentation teacher's (N, K, H, W) logits are N*H*W pixel samples, so that the
one-hot, information-entropy, KD and adversarial losses and the collapse guard's class histogram
all act per pixel, averaged over the batch's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress_toolbox.errors import DaflError

KNOWN_TASKS = ("classification", "segmentation", "detection")
SUPPORTED_TASKS = ("classification", "segmentation")  # what can be distilled today


@dataclass(frozen=True)
class Task:
    """What a task's teacher outputs: ``output_dims`` dimensions after the batch."""

    name: str
    output_dims: int
    output_text: str  # the expected output, for messages
    batch_size: int | None = None  # generated batch when no --batch-size (None: the preset's)
    student_init: str | None = None  # what --init auto means (None: the preset's choice)
    health_samples: int = 256  # generated inputs per health check (the class histogram)
    monitor_samples: int = 1000  # evaluation inputs for the curve during training
    # what is done to each generated image before the teacher sees it (keys of
    # generator.AUGMENTATIONS, in order; images only)
    generated_augmentations: tuple[str, ...] = ()

    def fits(self, output_shape: tuple[int, ...]) -> bool:
        """Whether a teacher whose output is ``output_shape`` (no batch) does this task."""
        return len(output_shape) == self.output_dims and output_shape[0] >= 2

    def check_output(self, teacher: nn.Module, shape: tuple[int, ...], device) -> int:
        """The number of classes of ``teacher``'s output on random inputs; DaflError when the
        output does not fit this task or is not finite."""
        with torch.no_grad():
            out = teacher(torch.rand(2, *shape, device=device))
        if not isinstance(out, torch.Tensor) or not self.fits(tuple(out.shape[1:])):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DaflError(f"teacher output is {got}; --task {self.name} needs {self.output_text}")
        if not torch.isfinite(out).all():
            raise DaflError("the teacher's output is NaN or infinite on random inputs")
        return int(out.shape[1])


TASKS = {
    "classification": Task("classification", 1, "(N, K) logits"),
    # Batch 16: 16 canvases of 64x64 are 65,536 pixel samples per batch, and more, cheaper
    # student steps beat fewer large ones in a fixed budget: on the benchmark U-Net at 180 s,
    # student mean IoU 50% of the teacher's at 16, 37% at 8, 24-30% at 32 (one seed each;
    # RESULTS.md). The fast preset's 128 was never tried: every step 8x dearer.
    # A derived student from the teacher's largest channels (BatchNorm folded) answered
    # background on every pixel and stayed so on the benchmark U-Net with dafl, dfad and
    # adversarial; fresh (with BatchNorm added) learned (benchmarks/RESULTS.md).
    # Every canvas is H*W pixel samples: 32 generated canvases of 64x64 give the health check
    # 131,072 pixels for its class histogram, and 200 evaluation canvases the curve 819,200;
    # 256 and 1,000 took 1.2 s per health check (every 10 iterations) and 1.6 s per curve
    # point, 31% of a 90 s run on the benchmark U-Net (RESULTS.md).
    # Generated scenes moved about (shift_and_flip): the generator otherwise puts the same
    # classes in the same places in every image (samples.png), and the student learns classes
    # by position. Then jittered in contrast, brightness, blur and noise (photometric): the
    # generator's images are black and white, real scenes are not. On the benchmark U-Net at
    # 600 s on a quiet CPU: 47% of the teacher's mean IoU without (one seed), 68-72% with
    # (three); paired 270-300 s runs on both teachers agree (RESULTS.md, session 7).
    "segmentation": Task("segmentation", 3, "(N, K, H, W) per-pixel logits", batch_size=16,
                         student_init="fresh", health_samples=32, monitor_samples=200,
                         generated_augmentations=("shift_and_flip", "photometric")),
}


def check_task(task: str) -> None:
    """DaflError for an unknown task or one that cannot be distilled yet."""
    if task not in KNOWN_TASKS:
        raise DaflError(f"--task {task}: unknown task; choose one of {', '.join(KNOWN_TASKS)}")
    if task not in SUPPORTED_TASKS:
        raise DaflError(
            f"--task {task} is not supported yet; only {' and '.join(SUPPORTED_TASKS)} are"
        )


def get_task(task: str) -> Task:
    """The ``Task`` named ``task`` (checked with ``check_task``)."""
    check_task(task)
    return TASKS[task]


def task_of_output(output_shape: tuple[int, ...]) -> str | None:
    """The supported task whose teachers give ``output_shape`` (no batch), else None."""
    return next((t.name for t in TASKS.values() if t.fits(tuple(output_shape))), None)


def as_samples(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) logits as they are; (N, K, *spatial) logits as (N * prod(spatial), K): one
    sample per pixel."""
    if logits.dim() <= 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def labels_as_samples(labels: torch.Tensor) -> torch.Tensor:
    """Class indices matching ``as_samples``: (N,) as they are, (N, *spatial) flattened."""
    return labels.reshape(-1)


class MainOutput(nn.Module):
    """A model whose output is a dict (torchvision's segmentation models: ``{"out": ...,
    "aux": ...}``), list or tuple, made to return its main tensor (``out``, else the first)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, dict):
            out = out["out"] if "out" in out else next(iter(out.values()))
        while isinstance(out, (list, tuple)):
            out = out[0]
        return out


class Softmaxed(nn.Module):
    """A logits model given back the Softmax its file ended in (over ``dim``): what the
    student is exported as when the teacher's file outputs probabilities, so that
    ``student.onnx`` answers like the teacher's file."""

    def __init__(self, model: nn.Module, dim: int = 1) -> None:
        super().__init__()
        self.model, self.dim = model, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=self.dim)


class SigmoidAsTwoClasses(nn.Module):
    """A model whose file ends in a one-channel Sigmoid (a binary map or classifier), cut
    before it, seen as two classes: logits (-z/2, z/2), whose softmax is (1 - p, p) with
    p = sigmoid(z), so the teacher is distilled and scored as a 2-class one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.model(x) / 2
        return torch.cat([-half, half], dim=1)


class SigmoidMap(nn.Module):
    """A 2-class logits model answering as a one-channel Sigmoid file does: p(class 1)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)[:, 1:2]


# how the teacher's file answers -> the student as it is shipped (``distilled_output`` values)
FILE_OUTPUTS = {
    "logits before its Softmax": Softmaxed,
    "the logit before its Sigmoid, as two classes": SigmoidMap,
}
