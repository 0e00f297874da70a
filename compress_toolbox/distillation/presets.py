"""Training recipes: the paper's (exactly as published) and ``fast`` (tuned on the suite).

Loss weights belong to the methods (``weights_type`` in methods/): a preset only lists, by
method name, the weights it sets otherwise (``Preset.loss_weights``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from compress_toolbox.distillation.generator import AUGMENTATIONS
from compress_toolbox.distillation.methods import check_loss_weights, get_method, loss_weights
from compress_toolbox.errors import DaflError


def _plain(value: Any) -> Any:
    """A preset field's value as JSON has it (tuples as lists, mappings as dicts)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class Preset:
    """Hyper-parameters of one training recipe (generator, student, schedule), and the loss
    weights it sets otherwise than the methods do."""

    name: str
    latent_dim: int
    batch_size: int
    gen_width: int  # channels of the generator's first conv block (paper: 128)
    gen_lr: float  # DAFL-family generators (dafl, adversarial); the paper: 0.2 (MNIST)
    student_optimizer: str  # "adam" or "sgd"
    student_lr: float  # a fresh student
    schedule: str  # "constant", "step" (x0.1 at 40% and 80%) or "cosine"
    epochs: int | None = None  # paper schedule length (epochs x iters_per_epoch iterations)
    iters_per_epoch: int = 120
    momentum: float = 0.9
    weight_decay: float = 0.0  # a fresh student's (L2, in the optimiser)
    student_steps: int = 1  # student updates per generated batch (generator step)
    pool_size: int = 1  # student steps draw from the last pool_size generated batches
    kd_temperature: float = 1.0  # softmax temperature of the KD loss (the paper: 1)
    student_lr_fine_tune: float | None = None  # a student from the teacher's weights (None:
    # student_lr)
    weight_decay_fine_tune: float | None = None  # the same student's (None: weight_decay)
    student_init: str = "fresh"  # what --init auto means: "fresh" (the paper) or "teacher"
    # "paper": tanh + BatchNorm(affine=False) output (DAFL); "domain": pixels in [0, 1] mapped
    # into the teacher's input domain (domain.py)
    generator_output: str = "paper"
    gen_lr_conditional: float = 1e-2  # class-conditional generators (conditional, bn-prior)
    # gen_lr where a task learns better at another rate: task name -> rate (see generator_lr)
    gen_lr_by_task: Mapping[str, float] = field(default_factory=dict, hash=False)
    # student_lr where a task's fresh students learn better at another rate (see student_rates)
    student_lr_by_task: Mapping[str, float] = field(default_factory=dict, hash=False)
    # method name -> {loss weight: value}, changing that method's own weights (its
    # ``weights_type``) and those of the methods derived from it (dafl's reach adversarial)
    loss_weights: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
    # CPU threads: "all" = os.cpu_count(), "auto" = time 1 vs all threads and keep the faster,
    # or a number.
    cpu_threads: str | int = "all"
    channels_last: bool = True  # teacher and student in channels-last memory format
    schedule_generator: bool = False  # apply the LR schedule to the generator too
    fit_schedule_to_budget: bool = False  # schedule progress = max(iter/iters, elapsed/budget)
    size_to_budget: bool = False  # choose batch / student steps from timed steps (recipe.py)
    default_time_budget: float | None = None  # seconds, used when no budget/iters/epochs given
    # what is done to each generated image before the teacher sees it (generator.AUGMENTATIONS
    # names, in order); None: what the task asks for (tasks.Task.generated_augmentations)
    augmentations: tuple[str, ...] | None = None
    description: str = ""

    def with_options(self, **changes) -> Preset:
        """A copy with some fields changed, and loss weights given as ``METHOD.WEIGHT``
        (``**{"dafl.oh": 0.5}``, as bench_suite.py's ``--set dafl.oh=0.5``); unknown names and
        bad values raise DaflError."""
        weights = {key: changes.pop(key) for key in list(changes) if "." in key}
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise DaflError(f"unknown preset field(s): {', '.join(unknown)} (loss weights are "
                            "set per method as METHOD.WEIGHT, e.g. dafl.oh)")  # fmt: skip
        for rate in ("gen_lr", "student_lr"):  # a rate set by name is every task's: the
            if rate in changes and f"{rate}_by_task" not in changes:  # table would win unseen
                changes[f"{rate}_by_task"] = {}
        if isinstance(changes.get("augmentations"), list):  # e.g. parsed from JSON
            changes["augmentations"] = tuple(changes["augmentations"])
        preset = replace(self, **changes)
        for key, value in weights.items():
            method, _, name = key.partition(".")
            preset = preset.with_weights(method, **{name: value})
        return preset.check()

    def with_weights(self, method: str, **weights: Any) -> Preset:
        """A copy whose loss weights of ``method`` are changed (``with_weights("dafl", oh=0.5)``;
        the others are kept); unknown names and bad values raise DaflError."""
        merged = {**self.loss_weights.get(method, {}), **weights}
        return replace(self, loss_weights={**self.loss_weights, method: merged}).check()

    def changes(self) -> dict[str, Any]:
        """Where this preset differs from the registered one of its name: field -> value, and
        loss weights as ``METHOD.WEIGHT`` -> the value that method trains with (a weight either
        preset sets, set otherwise or dropped); JSON-ready. {} for a registered preset as it
        is, or one whose name is not registered (its name says it is the user's own)."""
        named = PRESETS.get(self.name)
        if named is None:
            return {}
        names = [f.name for f in fields(self) if f.name != "loss_weights"]
        changed = {name: _plain(getattr(self, name)) for name in names
                   if getattr(self, name) != getattr(named, name)}  # fmt: skip
        for method in sorted({*self.loss_weights, *named.loss_weights}):
            cls = get_method(method)
            mine = asdict(loss_weights(cls, self.loss_weights))
            theirs = asdict(loss_weights(cls, named.loss_weights))
            either = {*self.loss_weights.get(method, {}), *named.loss_weights.get(method, {})}
            changed.update({f"{method}.{name}": mine[name] for name in sorted(either)
                            if mine[name] != theirs[name]})  # fmt: skip
        return changed

    def student_rates(self, fine_tune: bool, task: str | None = None) -> tuple[float, float]:
        """(learning rate, weight decay) of the student's optimiser: a fresh student's at
        ``task``'s own rate where the preset names one, else ``student_lr``; the
        ``*_fine_tune`` values, where set, for a student that starts from the teacher's
        weights."""
        if not fine_tune:
            return self.student_lr_by_task.get(task, self.student_lr), self.weight_decay
        lr, decay = self.student_lr_fine_tune, self.weight_decay_fine_tune
        return (self.student_lr if lr is None else lr,
                self.weight_decay if decay is None else decay)  # fmt: skip

    def generator_lr(self, task: str, conditional: bool) -> float:
        """The learning rate of a generator for ``task``: ``gen_lr_conditional`` for a
        class-conditional one, else the task's own rate where the preset names one, else
        ``gen_lr``."""
        if conditional:
            return self.gen_lr_conditional
        return self.gen_lr_by_task.get(task, self.gen_lr)

    def check(self) -> Preset:
        """Raise DaflError naming the first field with an impossible value; return self."""
        choices = {
            "student_optimizer": ("adam", "sgd"),
            "schedule": ("constant", "step", "cosine"),
            "student_init": ("fresh", "teacher"),
            "generator_output": ("paper", "domain"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise DaflError(f"preset {self.name}: {name} must be one of {', '.join(allowed)}")
        positive = ("latent_dim", "batch_size", "gen_width", "gen_lr", "student_lr",
                    "kd_temperature", "student_steps", "pool_size", "iters_per_epoch",
                    "gen_lr_conditional")  # fmt: skip
        numbers = {name: getattr(self, name) for name in positive}
        for name in ("gen_lr_by_task", "student_lr_by_task"):
            numbers.update({f"{name}[{task!r}]": rate
                            for task, rate in getattr(self, name).items()})  # fmt: skip
        for name, value in numbers.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise DaflError(
                    f"preset {self.name}: {name} must be a positive number, got {value!r}"
                )
        decays = {"weight_decay": self.weight_decay}
        if self.weight_decay_fine_tune is not None:  # None: weight_decay
            decays["weight_decay_fine_tune"] = self.weight_decay_fine_tune
        for name, value in decays.items():
            if isinstance(value, bool) or not (isinstance(value, (int, float))
                                               and math.isfinite(value) and value >= 0):
                raise DaflError(f"preset {self.name}: {name} must be a number >= 0, got {value!r}")
        unknown = sorted(set(self.augmentations or ()) - set(AUGMENTATIONS))
        if unknown:
            raise DaflError(f"preset {self.name}: unknown augmentation(s) {', '.join(unknown)}; "
                            f"known: {', '.join(AUGMENTATIONS)}")  # fmt: skip
        if self.batch_size < 2:
            raise DaflError(f"preset {self.name}: batch size must be at least 2 (BatchNorm)")
        for method, weights in self.loss_weights.items():
            check_loss_weights(method, weights)
        return self


PRESETS: dict[str, Preset] = {
    "paper-mnist": Preset(
        name="paper-mnist",
        latent_dim=100,
        batch_size=512,
        gen_width=128,
        gen_lr=0.2,
        student_optimizer="adam",
        student_lr=2e-3,
        loss_weights={},  # DAFL's own weights (methods/dafl.py) are this recipe's
        schedule="constant",  # the authors' code only decays the LR for non-MNIST datasets
        epochs=200,
        iters_per_epoch=120,
        description="authors' MNIST recipe: 200 epochs x 120 iterations, batch 512, no LR decay",
    ),
    "paper-cifar": Preset(
        name="paper-cifar",
        latent_dim=1000,
        batch_size=1024,
        gen_width=128,
        gen_lr=0.02,
        student_optimizer="sgd",
        student_lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        # DAFL's own weights are the MNIST recipe's; bn-prior's one-hot term (segmentation
        # teachers) has always taken the recipe's DAFL value
        loss_weights={"dafl": {"oh": 0.05, "a": 0.01}, "bn-prior": {"oh": 0.05}},
        schedule="step",
        epochs=2000,
        iters_per_epoch=120,  # DAFL_train.py loops range(120) per epoch for every dataset
        description="authors' CIFAR recipe: 2000 epochs x 120 iterations, student LR x0.1 at "
        "epochs 800 and 1600",
    ),
    # Measured on the teacher suite on a 2-core CPU (benchmarks/RESULTS.md).
    "fast": Preset(
        name="fast",
        latent_dim=100,
        batch_size=128,
        gen_width=16,
        # 0.2 (the paper's) saturated the pixel-domain generator into flat patches on detectors
        # and cost BatchNorm-folded classifiers 8-11 points of the teacher's accuracy at 180 s;
        # segmentation lost 12 points of the teacher's mean IoU at 0.02 on unet-seg (gained 10
        # on lraspp-seg), so it keeps 0.2 (benchmarks/RESULTS.md)
        gen_lr=0.02,
        gen_lr_by_task={"segmentation": 0.2},
        student_optimizer="adam",
        student_lr=5e-3,
        # segmentation's fresh students at 1e-2: the LR-ASPP's kept 85-86% of its teacher's
        # mean IoU against 75-77% at 5e-3 (450 iterations, equal), the U-Net's 71.8% against
        # 70.3%; at 600 s 78.5% and 70.7%, against 72.9% and 71.3% at 5e-3 on another day and CPU
        # (medians of 3 seeds, benchmarks/RESULTS.md)
        student_lr_by_task={"segmentation": 1e-2},
        # 1e-4 for a fresh student: the folded ResNets' students (the suite's only fresh ones)
        # gained at equal iterations (benchmarks/RESULTS.md); one from the teacher's weights
        # keeps none (level at 1e-4, worse above on lenet5-fashion), so a --set weight_decay
        # does not reach it: set weight_decay_fine_tune
        weight_decay=1e-4,
        weight_decay_fine_tune=0.0,
        loss_weights={"dafl": {"bounded_activation": True}},
        schedule="cosine",
        kd_temperature=4.0,
        student_steps=12,
        pool_size=24,
        student_lr_fine_tune=1e-3,
        student_init="teacher",
        generator_output="domain",
        fit_schedule_to_budget=True,
        size_to_budget=True,
        cpu_threads="auto",
        default_time_budget=120.0,
        description="tuned for speed on a 2-core CPU: batch 128, 16-channel generator at 0.02 "
        "(segmentation: 0.2), 12 student "
        "steps per generated batch drawn from the last 24 batches, KD at temperature 4, cosine "
        "LR fitted to the budget, a fresh student at 5e-3 (segmentation: 1e-2) with weight decay "
        "1e-4",
    ),
}


def get_preset(preset: str | Preset) -> Preset:
    """A preset by name (DaflError naming the known ones when unknown), or the preset itself."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise DaflError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]
