"""A small torchvision-style registry of model builders, keyed by name and task.

Each entry carries its cost, as torchvision's weights carry ``meta``: parameters and MACs at its
default input (``ZooEntry.meta``), and an estimate at any other input without building the model
(``ZooEntry.estimate``), so that ``pick_student`` builds only the models worth measuring."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from compress_toolbox.tasks import task_names

# builder(*, num_classes, in_channels=3, input_size=None, **family_options) -> nn.Module
Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ZooCost:
    """A model's parameters and multiply-accumulates at one input, as ``analyse`` counts them
    (``macs`` None: ``analyse`` cannot run the model)."""

    params: int
    macs: int | None


# cost(*, num_classes, in_channels, input_size) -> ZooCost, computed without building the model
CostRule = Callable[..., ZooCost]
# ZooEntry.estimate is within this factor of the measured parameters and MACs for inputs of
# 28 px and more (tests/test_zoo.py); smaller inputs cost relatively more (rounded-up strides)
ESTIMATE_SLACK = 3.0


def scale_by_pixels(meta: ZooCost, reference: tuple[int, int],
                    input_size: tuple[int, int]) -> ZooCost:  # fmt: skip
    """``meta`` (measured at ``reference`` (H, W)) with its MACs scaled by the pixel count and
    its parameters kept: a convolutional network with global pooling or a per-pixel head."""
    if meta.macs is None:
        return meta
    ratio = input_size[0] * input_size[1] / (reference[0] * reference[1])
    return replace(meta, macs=round(meta.macs * ratio))


@dataclass(frozen=True)
class ZooEntry:
    """One registered model: its builder, the input it was designed for and its cost there."""

    name: str
    task: str
    family: str
    builder: Builder
    default_input: tuple[int, int, int]  # (C, H, W)
    default_num_classes: int
    meta: ZooCost  # at default_input with default_num_classes
    cost: CostRule | None = None  # the cost at any input; None: meta scaled by the pixels

    def estimate(self, *, num_classes: int, in_channels: int,
                 input_size: tuple[int, int]) -> ZooCost:  # fmt: skip
        """The cost of ``build(...)`` with these arguments, without building it: exact where
        the entry has a cost rule, else ``meta`` scaled by the pixel count (within a factor
        ``ESTIMATE_SLACK`` of the measured cost; tests/test_zoo.py checks it)."""
        if self.cost is not None:
            return self.cost(num_classes=num_classes, in_channels=in_channels,
                             input_size=tuple(input_size))  # fmt: skip
        return scale_by_pixels(self.meta, self.default_input[1:], input_size)

    def build(
        self,
        *,
        num_classes: int | None = None,
        in_channels: int | None = None,
        input_size: tuple[int, int] | None = None,
        **options: Any,
    ) -> nn.Module:
        """Build with fresh weights; unspecified arguments fall back to the entry's defaults;
        ``options`` are the family's own (a detector's ``head``, ...)."""
        return self.builder(
            num_classes=self.default_num_classes if num_classes is None else num_classes,
            in_channels=self.default_input[0] if in_channels is None else in_channels,
            input_size=tuple(self.default_input[1:]) if input_size is None else tuple(input_size),
            **options,
        )


_REGISTRY: dict[str, ZooEntry] = {}


def register_model(
    *,
    task: str,
    family: str,
    default_input: tuple[int, int, int],
    default_num_classes: int,
    meta: ZooCost | None = None,
    cost: CostRule | None = None,
    name: str | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under its function name (or ``name``), with its cost:
    ``meta`` (measured at ``default_input``), a ``cost`` rule, or both (``meta`` defaults to the
    rule's cost at ``default_input``)."""
    if task not in task_names():
        raise ValueError(f"unknown task {task!r}; expected one of: {', '.join(task_names())}")
    if len(default_input) != 3:
        raise ValueError(f"default_input must be (C, H, W), got {default_input!r}")
    if meta is None and cost is None:
        raise ValueError("a zoo model needs its cost: meta=ZooCost(...) or a cost rule")
    if meta is None:
        meta = cost(num_classes=default_num_classes, in_channels=default_input[0],
                    input_size=tuple(default_input[1:]))  # fmt: skip

    def decorator(builder: Builder) -> Builder:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(f"zoo model {key!r} is already registered")
        _REGISTRY[key] = ZooEntry(
            name=key,
            task=task,
            family=family,
            builder=builder,
            default_input=tuple(default_input),
            default_num_classes=default_num_classes,
            meta=meta,
            cost=cost,
        )
        return builder

    return decorator


def list_models(task: str | None = None) -> list[str]:
    """Sorted names of registered models, optionally only those of ``task``."""
    if task is not None and task not in task_names():
        raise ValueError(f"unknown task {task!r}; expected one of: {', '.join(task_names())}")
    return sorted(name for name, entry in _REGISTRY.items() if task is None or entry.task == task)


def get_entry(name: str) -> ZooEntry:
    """The registry entry for ``name``; ``ValueError`` listing known names if absent."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models())
        raise ValueError(f"unknown zoo model {name!r}; known: {known}") from None


def get_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    **options: Any,
) -> nn.Module:
    """Build zoo model ``name`` with fresh (random) weights; ``options`` are its family's own
    (a detector's ``head`` and ``locations``: the raw output to give)."""
    entry = get_entry(name)
    if input_size is None:
        input_size = tuple(entry.default_input[1:])
    return entry.builder(
        num_classes=num_classes, in_channels=in_channels, input_size=tuple(input_size), **options
    )
