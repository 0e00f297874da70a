"""The interface every distillation method implements, and the shared generator machinery.

A method makes the inputs the student learns from: each call of ``generate`` returns one batch
of inputs (in the teacher's input domain) with the teacher's logits on them, after updating its
generator if it has one. The trainer (distill.py) owns the student's updates, the replay pool,
the schedule and the health checks; a method owns only its generator and its losses.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from compress_toolbox.distillation.distributed import world
from compress_toolbox.distillation.generator import augment, make_generator
from compress_toolbox.distillation.losses import spread_features, uniformity_loss
from compress_toolbox.distillation.methods import LossWeights, loss_weights
from compress_toolbox.distillation.optimizers import adam
from compress_toolbox.distillation.presets import Preset
from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflWarning
from compress_toolbox.tasks import Task, get_task


@dataclass
class MethodContext:
    """What a method may use: the frozen teacher, the student being trained, the input."""

    teacher: nn.Module  # eval mode, no parameter gradients, on ``device``
    student: nn.Module  # read (never updated) by adversarial terms
    input_shape: tuple[int, ...]
    num_classes: int
    domain: InputDomain
    preset: Preset
    device: torch.device
    final_layer: str | None = None  # the teacher's last Linear/1x1 conv (activation loss)
    autocast: Callable[[], AbstractContextManager] = nullcontext  # a context manager factory
    channels_last: bool = False  # generators in channels-last memory format (faster on CPU)
    task: Task | str = "classification"  # a Task once built
    student_from_teacher: bool = False  # the student starts from the teacher's weights, not fresh

    def __post_init__(self) -> None:
        self.task = get_task(self.task)

    def batchnorm_layers(self) -> int:
        """Number of BatchNorm layers with running statistics in the teacher."""
        return batchnorm_layers(self.teacher)


def batchnorm_layers(module: nn.Module) -> int:
    """Number of BatchNorm layers with running statistics in ``module``."""
    return sum(
        isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.running_mean is not None
        for m in module.modules()
    )


@dataclass
class GeneratedBatch:
    """Inputs for the student (detached, in the teacher's domain) and the teacher's logits."""

    x: torch.Tensor
    teacher_logits: torch.Tensor
    losses: dict[str, float]  # generator loss terms, unweighted (empty for generator-free)


class Method(ABC):
    """One way of making training inputs without data. Subclasses set ``name`` and ``summary``
    (and ``weights_type`` when they have loss terms) and register with ``@register_method``
    (methods/__init__.py)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    loss_names: ClassVar[tuple[str, ...]] = ()  # the keys of GeneratedBatch.losses
    weights_type: ClassVar[type[LossWeights]] = LossWeights  # its loss weights, with defaults
    generator: nn.Module | None = None

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.weights = self.weights_for(ctx)

    @classmethod
    def weights_for(cls, ctx: MethodContext) -> LossWeights:
        """The weights this method trains with on ``ctx``: its weights type's defaults,
        changed where the preset says (methods/__init__.py)."""
        return loss_weights(cls, ctx.preset.loss_weights)

    def note(self) -> str | None:
        """What the report should add to the method's line about how it adapted to this
        teacher and student (None: nothing)."""
        return None

    @classmethod
    def unavailable_reason(cls, ctx: MethodContext) -> str | None:
        """Why this method cannot run on this teacher (None: it can)."""
        return None

    @abstractmethod
    def generate(self, batch_size: int) -> GeneratedBatch:
        """One batch of training inputs, after one update of the generator (if any)."""

    @abstractmethod
    def sample(self, n: int) -> torch.Tensor:
        """``n`` fresh inputs without gradients (health checks, pictures)."""

    def restart(self) -> None:  # noqa: B027 - optional: methods without a generator
        """Start the generator afresh (after a collapse of the generated classes)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional
        """Restore what ``state_dict`` returned."""

    def close(self) -> None:  # noqa: B027 - optional: only methods with hooks
        """Remove any hooks this method put on the teacher."""


def as_floats(terms: dict[str, tuple[float, torch.Tensor]]) -> dict[str, float]:
    """Each term's unweighted loss as a number, read from the device in one wait (a GPU
    otherwise stalls once per term)."""
    if not terms:
        return {}
    values = torch.stack([value.detach().float().reshape(()) for _, value in terms.values()])
    return dict(zip(terms, values.tolist()))


@contextmanager
def frozen(module: nn.Module):
    """Gradients may flow through ``module`` to its input, but none accumulate in it."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for param, flag in zip(module.parameters(), flags):
            param.requires_grad_(flag)


class FeatureHook:
    """Keeps the input of one teacher layer (DAFL's activation and diversity losses read the
    final layer's)."""

    def __init__(self, module: nn.Module, layer_name: str) -> None:
        self.value: torch.Tensor | None = None
        layer = module.get_submodule(layer_name)
        self._handle = layer.register_forward_pre_hook(self._keep)

    def _keep(self, _layer, inputs) -> None:
        self.value = inputs[0]

    def pop(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the teacher's final layer did not run")
        return value

    def close(self) -> None:
        self._handle.remove()


def final_layer_hook(ctx: MethodContext, terms: Mapping[str, float]) -> FeatureHook | None:
    """A hook on the input of the teacher's final layer when any of ``terms`` (loss name ->
    weight) is on; None when none is, or when the teacher has no final layer (with a warning
    naming the terms that are then off)."""
    wanted = [name for name, weight in terms.items() if weight > 0]
    if not wanted:
        return None
    if ctx.final_layer is None:
        losses = "losses" if len(wanted) > 1 else "loss"
        warnings.warn(f"teacher has no final Linear/1x1-conv layer: {' and '.join(wanted)} "
                      f"{losses} disabled", DaflWarning, stacklevel=3)  # fmt: skip
        return None
    return FeatureHook(ctx.teacher, ctx.final_layer)


# the diversity term compares each generated batch with the teacher's features of this many
# earlier samples (8 batches of the fast preset): more than one batch, so that the generator
# cannot cycle among a few modes from batch to batch
FEATURE_BANK = 1024


class SampleSpread:
    """The diversity term of generated samples (losses.uniformity_loss on the teacher's
    features) and the features of the last FEATURE_BANK samples, newest first, that each batch
    is compared with. They are kept across a restart of the generator, so that the new one is
    pushed away from what a collapsed one made. Under torchrun every rank compares with the
    other ranks' batches too and keeps the same earlier features."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.earlier: torch.Tensor | None = None

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        """This batch's term; its features then join the earlier ones."""
        spread = spread_features(features)
        ranks = world()
        everyone = ranks.all_gather_cat(spread.detach())  # rank order, equal batches
        n = len(spread)
        others = torch.cat([everyone[: ranks.rank * n], everyone[(ranks.rank + 1) * n :]])
        loss = uniformity_loss(spread, self._after(others))
        self.earlier = self._after(everyone)[:FEATURE_BANK].clone()
        return loss

    def _after(self, newest: torch.Tensor) -> torch.Tensor:
        return newest if self.earlier is None else torch.cat([newest, self.earlier])

    def state_dict(self) -> dict[str, Any]:
        """The earlier features, for the method's state."""
        return {"earlier_features": self.earlier}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The earlier features from a method's state (which torchrun reads onto the CPU; a
        checkpoint from before the term has none)."""
        earlier = state.get("earlier_features")
        self.earlier = None if earlier is None else earlier.to(self.device)


class GeneratorMethod(Method):
    """A method with a generator trained by a weighted sum of loss terms on the teacher's
    answers (``loss_terms``). ``conditional`` generators take a class label per sample, drawn
    so that every batch is balanced over the teacher's classes."""

    conditional: ClassVar[bool] = False

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        # images only: a (F,) vector has no layout to move
        images = len(ctx.input_shape) == 3
        chosen = ctx.preset.augmentations
        self.augmentations = () if not images else (
            ctx.task.generated_augmentations if chosen is None else chosen)  # fmt: skip
        # the teacher's domain where the generator makes pixels in it (see restart)
        self.pixel_domain = ctx.domain if ctx.preset.generator_output == "domain" else None
        self.restart()

    def restart(self) -> None:
        preset = self.ctx.preset
        self.generator = make_generator(
            self.ctx.input_shape,
            preset.latent_dim,
            preset.gen_width,
            num_classes=self.ctx.num_classes if self.conditional else 0,
            domain=self.pixel_domain,
        ).to(self.ctx.device)
        if self.ctx.channels_last:
            self.generator.to(memory_format=torch.channels_last)
        lr = preset.generator_lr(self.ctx.task.name, self.conditional)
        self.optimizer = adam(self.generator.parameters(), lr)

    def _latent(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(n, self.ctx.preset.latent_dim, device=self.ctx.device)
        if not self.conditional:
            return z, None
        classes = self.ctx.num_classes
        labels = torch.arange(n, device=self.ctx.device) % classes  # balanced by construction
        return z, labels[torch.randperm(n, device=self.ctx.device)]

    @abstractmethod
    def loss_terms(
        self, x: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """name -> (weight, unweighted loss) for one generated batch (teacher already run)."""

    def generate(self, batch_size: int) -> GeneratedBatch:
        self.generator.train()
        z, labels = self._latent(batch_size)
        with self.ctx.autocast():
            x = self._images(z, labels)
            logits = self.ctx.teacher(x).float()
            terms = self.loss_terms(x, logits, labels)
        total = sum(weight * value for weight, value in terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return GeneratedBatch(x.detach(), logits.detach(), as_floats(terms))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        z, labels = self._latent(n)
        with self.ctx.autocast():
            return self._images(z, labels).float()

    def _images(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The generator's output, augmented at random where the task asks for it."""
        return augment(self.generator(z, labels), self.augmentations, self.pixel_domain)

    def student_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The student's logits on ``x``, differentiable w.r.t. ``x`` only (adversarial terms)."""
        with frozen(self.ctx.student):
            return self.ctx.student(x).float()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
