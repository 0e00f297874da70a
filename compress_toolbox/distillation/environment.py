"""How a run uses its device: autocast, the memory one iteration takes,
channels-last memory format, denormal floats. The trainer asks; these functions only measure
and set up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from compress_toolbox.distillation.methods.base import Method
from compress_toolbox.distillation.recipe import activation_bytes, check_sample_fits
from compress_toolbox.errors import TrainingFailed
from compress_toolbox.limits import available_memory
from compress_toolbox.load.teacher import Teacher


def autocast_factory(dev: torch.device):
    """bf16 autocast on CUDA when supported, else none (fp16 would need loss scaling; CPU
    autocast measured slower for these small convs)."""
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Denormal floats (below 1.2e-38) read and written as zero on the CPU inside the block,
    then back to torch's default (torch cannot say what it was). Weight decay drives the
    weights of channels that stop learning towards zero; once denormal, every convolution
    that reads them ran 1.6-2.4x slower per student step (an LR-ASPP student with a quarter of
    its weights denormal, x86; benchmarks/RESULTS.md), and no answer changes at that size."""
    flushing = torch.set_flush_denormal(True)  # False where the CPU cannot
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(False)


def _bytes_per_sample(module: nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
    """Activation bytes per sample of ``module`` on inputs of ``shape`` (measured at batch 2)."""
    x = torch.zeros(2, *shape, device=device)
    return activation_bytes(module, lambda: module.eval()(x), 2)


def iteration_bytes_per_sample(teacher: Teacher, student: nn.Module, method: Method,
                               device: torch.device) -> int:  # fmt: skip
    """Memory one generated sample takes in an iteration: generator, teacher (with input
    gradients) and student activations, twice for the backward pass."""
    shape = tuple(teacher.input_shape)
    student_mode = student.training
    per_sample = 2 * (_bytes_per_sample(teacher.module, shape, device)
                      + _bytes_per_sample(student, shape, device))  # fmt: skip
    student.train(student_mode)
    if method.generator is not None:
        per_sample += 2 * activation_bytes(method.generator, lambda: method.sample(2), 2)
    return per_sample


def check_teacher_fits(teacher: Teacher, device: torch.device) -> None:
    """Refuse, before a student is made for it (which runs the teacher many times), an input
    shape whose teacher activations alone, a lower bound of what an iteration takes
    (``iteration_bytes_per_sample``), do not fit ``device``'s free memory."""
    shape = tuple(teacher.input_shape)
    where = next(teacher.module.parameters(), torch.empty(0)).device  # measured where it is
    with torch.no_grad():
        per_sample = 2 * _bytes_per_sample(teacher.module, shape, where)
    check_sample_fits(per_sample, available_memory(device), shape)


def try_channels_last(teacher: Teacher, student: nn.Module, method: Method,
                      device: torch.device) -> bool:  # fmt: skip
    """Put teacher, student and generator in channels-last memory format (measured 18-33%
    faster student steps on a CPU: benchmarks/bench_speedups.py); revert when either model
    cannot run that way (a ``.view`` in user code) or computes anything else."""
    if len(teacher.input_shape) != 3:
        return False
    modules = (teacher.module, student)
    x = torch.rand(2, *teacher.input_shape, device=device)
    try:
        with torch.no_grad():
            before = [m.eval()(x) for m in modules]
            for module in modules:
                module.to(memory_format=torch.channels_last)
            after = [m(x.contiguous(memory_format=torch.channels_last)) for m in modules]
        same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(before, after))
    except Exception:  # noqa: BLE001 - any failure: stay with the default layout
        same = False
    student.train()
    if not same:
        for module in modules:
            module.to(memory_format=torch.contiguous_format)
    elif method.generator is not None:  # measured 17-38% faster generator steps too
        method.ctx.channels_last = True
        method.generator.to(memory_format=torch.channels_last)
    return same


def check_finite(student: nn.Module, iteration: int) -> None:
    """A last step can leave NaN weights behind finite losses: fail here, as training."""
    for name, tensor in [*student.named_parameters(), *student.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingFailed(
                f"the student's {name} became NaN or infinite by iteration {iteration}; try a "
                "lower learning rate or another --method"
            )
