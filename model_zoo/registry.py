"""A small torchvision-style registry of model builders, keyed by name and task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from compress_toolbox.tasks import task_names

# builder(*, num_classes, in_channels=3, input_size=None) -> nn.Module
Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ZooEntry:
    """One registered model: its builder and the input it was designed for."""

    name: str
    task: str
    family: str
    builder: Builder
    default_input: tuple[int, int, int]  # (C, H, W)
    default_num_classes: int

    def build(
        self,
        *,
        num_classes: int | None = None,
        in_channels: int | None = None,
        input_size: tuple[int, int] | None = None,
    ) -> nn.Module:
        """Build with fresh weights; unspecified arguments fall back to the entry's defaults."""
        return self.builder(
            num_classes=self.default_num_classes if num_classes is None else num_classes,
            in_channels=self.default_input[0] if in_channels is None else in_channels,
            input_size=tuple(self.default_input[1:]) if input_size is None else tuple(input_size),
        )


_REGISTRY: dict[str, ZooEntry] = {}


def register_model(
    *,
    task: str,
    family: str,
    default_input: tuple[int, int, int],
    default_num_classes: int,
    name: str | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under its function name (or ``name``)."""
    if task not in task_names():
        raise ValueError(f"unknown task {task!r}; expected one of: {', '.join(task_names())}")
    if len(default_input) != 3:
        raise ValueError(f"default_input must be (C, H, W), got {default_input!r}")

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
) -> nn.Module:
    """Build zoo model ``name`` with fresh (random) weights."""
    entry = get_entry(name)
    if input_size is None:
        input_size = tuple(entry.default_input[1:])
    return entry.builder(
        num_classes=num_classes, in_channels=in_channels, input_size=tuple(input_size)
    )
