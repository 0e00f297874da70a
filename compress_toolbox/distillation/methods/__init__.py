"""Distillation methods by name: one file each, registered with ``@register_method``.

Adding a method: a new module in this package with a ``Method`` subclass decorated by
``@register_method`` (its one-line ``summary`` is what ``--method``'s help says of it); every
module here is imported when the registry is first used. A method with loss terms declares its
weights as a frozen ``LossWeights`` dataclass in its own file (``weights_type``), whose defaults
are the method's own values; a preset changes them by method name (``Preset.loss_weights``), so
adding a method never edits presets.py."""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from compress_toolbox.errors import DaflError

_REGISTRY: dict[str, type] = {}


@dataclass(frozen=True)
class LossWeights:
    """Base of each method's loss weights (and loss settings): a frozen dataclass whose every
    field has a default, the method's own value; fields holding a bool are switches, the others
    non-negative numbers."""


def register_method(cls: type) -> type:
    """Class decorator: make ``cls`` (a ``Method`` subclass) available as ``cls.name``, its
    ``summary`` (one line) listed in ``--method``'s help."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    summary = getattr(cls, "summary", None)
    if not (isinstance(summary, str) and summary.strip() and "\n" not in summary):
        raise ValueError(f"method {cls.name!r}: summary must be one line of text")
    weights = getattr(cls, "weights_type", None)
    frozen = is_dataclass(weights) and weights.__dataclass_params__.frozen
    if not (frozen and issubclass(weights, LossWeights)):
        raise ValueError(f"method {cls.name!r}: weights_type must be a frozen LossWeights "
                         "dataclass")  # fmt: skip
    for parent in _lineage(cls):
        if not issubclass(weights, parent.weights_type):
            raise ValueError(f"method {cls.name!r}: its weights must extend those of "
                             f"{parent.name!r} ({parent.weights_type.__name__})")  # fmt: skip
    weights()  # every field has a default (TypeError otherwise)
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "auto"):
            importlib.import_module(f"{__name__}.{info.name}")


def method_names() -> list[str]:
    """Registered method names (``auto`` is not one: it chooses among them)."""
    _load_all()
    return sorted(_REGISTRY)


def method_summaries() -> dict[str, str]:
    """Registered method name -> its one-line ``summary``, by name."""
    _load_all()
    return {name: _REGISTRY[name].summary for name in sorted(_REGISTRY)}


def get_method(name: str) -> type:
    """The ``Method`` class registered as ``name``."""
    _load_all()
    if name not in _REGISTRY:
        raise DaflError(f"unknown method {name!r}; choose one of auto, race, "
                        f"{', '.join(method_names())}")  # fmt: skip
    return _REGISTRY[name]


def _lineage(cls: type) -> list[type]:
    """The registered methods ``cls`` derives from (itself included), the most general first."""
    return [c for c in reversed(cls.__mro__)
            if "name" in vars(c) and _REGISTRY.get(c.name) is c]  # fmt: skip


def _checked_value(method: str, default: Any, name: str, value: Any) -> Any:
    """``value`` for weight ``name`` of ``method`` (numbers as float); DaflError when its type
    differs from the default's or a number is negative or not finite. A weight whose default
    is None (the method decides) takes None back."""
    if default is None and value is None:
        return None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise DaflError(f"loss weight {method}.{name} must be true or false, got {value!r}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value >= 0):
        raise DaflError(f"loss weight {method}.{name} must be a number >= 0, got {value!r}")
    return float(value)


def check_loss_weights(method: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (weight name -> value) checked against the weights of method ``method``;
    DaflError, one line, naming an unknown method or weight or a bad value."""
    _load_all()
    if method not in _REGISTRY:
        raise DaflError(f"loss weights for unknown method {method!r}; choose one of "
                        f"{', '.join(method_names())}")  # fmt: skip
    defaults = _REGISTRY[method].weights_type()
    known = [f.name for f in fields(defaults)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise DaflError(f"unknown loss weight(s) {', '.join(f'{method}.{n}' for n in unknown)}; "
                        f"{method} has: {', '.join(known) or 'none'}")  # fmt: skip
    return {name: _checked_value(method, getattr(defaults, name), name, value)
            for name, value in values.items()}  # fmt: skip


def loss_weights(cls: type, overrides: Mapping[str, Mapping[str, Any]]) -> LossWeights:
    """The weights method class ``cls`` trains with: its ``weights_type``'s defaults, changed
    by ``overrides`` (method name -> {weight: value}) given for each registered method it
    derives from, the most general first (a preset's ``dafl`` values reach ``adversarial``)."""
    values: dict[str, Any] = {}
    for method in _lineage(cls):
        values.update(check_loss_weights(method.name, overrides.get(method.name, {})))
    return cls.weights_type(**values)
