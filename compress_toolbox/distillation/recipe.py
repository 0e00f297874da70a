"""A recipe sized to the teacher and the device: batch, student steps per generated batch and
replay-pool size, chosen from the measured time of one generator step and one student step so
that the budget buys enough iterations; warns, with the budget needed, when it cannot."""

from __future__ import annotations

import statistics
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from compress_toolbox.distillation.presets import Preset
from compress_toolbox.errors import DaflError, DaflWarning

MIN_USEFUL_ITERATIONS = 200  # below this no suite teacher got a usable student (RESULTS.md)
TARGET_ITERATIONS = 400  # fewer student steps per generated batch until the budget buys this


@dataclass
class Recipe:
    """What one iteration does: one generator step on ``batch_size`` generated inputs, then
    ``student_steps`` student steps on batches drawn from the last ``pool_size`` ones."""

    batch_size: int
    student_steps: int
    pool_size: int
    generate_s: float | None = None  # measured seconds of one generator step
    student_step_s: float | None = None  # measured seconds of one student step
    expected_iterations: int | None = None
    warning: str | None = None
    # "counts": an --iters/--epochs run, the same on any load; "timings": a time-budgeted run,
    # whose student steps per generated batch follow the measured step times
    sized_by: str = "counts"
    replans: int = 0  # times the measured iteration time drifted from the plan (RateWatch)
    # seconds of health checks per iteration (one check's time over the iterations between
    # checks): at 800 x 608 they cost a quarter of a run the plan did not count
    checks_s: float = 0.0
    planned_total: int | None = None  # the run's iterations as the last (re-)plan expects them

    @classmethod
    def from_preset(cls, preset: Preset, batch_size: int | None = None) -> Recipe:
        return cls(batch_size or preset.batch_size, preset.student_steps, preset.pool_size)

    @property
    def iteration_s(self) -> float | None:
        if self.generate_s is None or self.student_step_s is None:
            return None
        return self.generate_s + self.student_steps * self.student_step_s + self.checks_s

    def describe(self) -> str:
        text = (
            f"batch {self.batch_size}, {self.student_steps} student step(s) per generated "
            f"batch, pool of {self.pool_size}"
        )
        if self.iteration_s is not None:
            text += (
                f"; measured {self.generate_s * 1000:.0f} ms per generator step and "
                f"{self.student_step_s * 1000:.0f} ms per student step"
            )
            if self.checks_s:
                text += f", {self.checks_s * 1000:.0f} ms of health checks per iteration"
        if self.expected_iterations is not None:
            text += f": about {self.expected_iterations} iterations"
        return text


def size_recipe(
    recipe: Recipe,
    generate_s: float,
    student_step_s: float,
    remaining_s: float | None,
    adapt: bool,
    target_iterations: int = TARGET_ITERATIONS,
) -> Recipe:
    """Fill in the measured times and the iterations ``remaining_s`` seconds buy; with
    ``adapt``, trade student steps for generator steps when ``remaining_s`` would buy fewer
    than ``target_iterations`` (a re-plan asks only for what the run still lacks of them)."""
    sized = replace(recipe, generate_s=generate_s, student_step_s=student_step_s)
    if remaining_s is None:
        return sized
    if adapt:
        # Fewer student steps per generated batch when the generator would get too few
        # updates (an expensive teacher), but never fewer than 4.
        while sized.student_steps > 4 and remaining_s / sized.iteration_s < target_iterations:
            sized = replace(sized, student_steps=sized.student_steps - 2)
    sized.expected_iterations = int(remaining_s / sized.iteration_s)
    if sized.expected_iterations < MIN_USEFUL_ITERATIONS:
        needed = MIN_USEFUL_ITERATIONS * sized.iteration_s
        sized.warning = (
            f"the budget buys only about {sized.expected_iterations} iterations on this "
            f"device; a usable student typically needs {MIN_USEFUL_ITERATIONS}+, about "
            f"{needed:.0f} s of training here"
        )
    return sized


# A measured iteration time this many times the plan's (or its inverse): re-plan. At 1.25, two
# LeNet-5 runs sharing a 2-core CPU re-planned 12-16 times in 180 s on noise alone.
DRIFT = 1.5
DRIFT_WINDOW = 10  # iterations whose median step times are compared with the plan


class RateWatch:
    """The step times of a time-budgeted run's last ``window`` iterations, to notice when the
    machine got slower or faster than the plan assumed (another job started or ended)."""

    def __init__(self, window: int = DRIFT_WINDOW) -> None:
        self.generate_s: deque[float] = deque(maxlen=window)
        self.student_step_s: deque[float] = deque(maxlen=window)
        self.checks_s: deque[float] = deque(maxlen=window)

    def add(self, generate_s: float, student_step_s: float, checks_s: float = 0.0) -> None:
        """One iteration's step times and the health checks' seconds per iteration (the last
        check's time over the iterations between checks)."""
        self.generate_s.append(generate_s)
        self.student_step_s.append(student_step_s)
        self.checks_s.append(checks_s)

    def drifted(self, recipe: Recipe) -> tuple[float, float, float] | None:
        """The window's median (generator, student step) seconds and its mean health-check
        seconds per iteration when a whole window's iteration time is more than DRIFT times
        from ``recipe``'s either way, else None."""
        if len(self.generate_s) < (self.generate_s.maxlen or 0) or not recipe.iteration_s:
            return None
        times = (statistics.median(self.generate_s), statistics.median(self.student_step_s),
                 statistics.fmean(self.checks_s))  # fmt: skip
        took_s = times[0] + recipe.student_steps * times[1] + times[2]
        return times if not 1 / DRIFT <= took_s / recipe.iteration_s <= DRIFT else None

    def clear(self) -> None:
        self.generate_s.clear()
        self.student_step_s.clear()
        self.checks_s.clear()


MEMORY_SHARE = 0.6  # of the memory free at the start, for one iteration's activations


def activation_bytes(module: nn.Module, run: Callable[[], object], batch: int) -> int:
    """Bytes of every leaf module's output per sample while ``run()`` (a forward pass of
    ``batch`` samples through ``module``) runs: roughly what a backward pass keeps."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [leaf.register_forward_hook(count) for leaf in leaves]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return total // batch


def check_sample_fits(per_sample_bytes: int, free_bytes: int | None,
                      shape: tuple[int, ...]) -> None:  # fmt: skip
    """DaflError when a batch of 2 samples of ``per_sample_bytes`` each does not fit in
    MEMORY_SHARE of ``free_bytes`` (None: the platform does not say; nothing is checked)."""
    if free_bytes is None or 2 * per_sample_bytes <= MEMORY_SHARE * free_bytes:
        return
    raise DaflError(
        f"inputs of shape {tuple(shape)} need about {per_sample_bytes / 2**30:.1f} GiB per "
        f"generated sample, more than this device can hold ({free_bytes / 2**30:.1f} GiB "
        "free); is the declared input shape right (--input-shape)?"
    )


def fit_batch_to_memory(recipe: Recipe, per_sample_bytes: int, free_bytes: int | None,
                        shape: tuple[int, ...]) -> Recipe:  # fmt: skip
    """Halve the batch until one iteration's activations fit in MEMORY_SHARE of the free
    memory; DaflError when even a batch of 2 does not fit."""
    if free_bytes is None or per_sample_bytes <= 0:
        return recipe
    check_sample_fits(per_sample_bytes, free_bytes, shape)  # a batch of 2 fits, or none does
    budget = MEMORY_SHARE * free_bytes
    batch = recipe.batch_size
    while batch > 2 and batch * per_sample_bytes > budget:
        batch //= 2
    if batch == recipe.batch_size:
        return recipe
    warnings.warn(
        f"batch {recipe.batch_size} would need about "
        f"{recipe.batch_size * per_sample_bytes / 2**30:.1f} GiB; using batch {batch}",
        DaflWarning,
        stacklevel=2,
    )
    return replace(recipe, batch_size=batch)
