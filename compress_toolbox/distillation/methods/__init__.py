"""Distillation methods by name: one file each, registered with ``@register_method``.

Adding a method: a new module in this package with a ``Method`` subclass decorated by
``@register_method``; every module here is imported when the registry is first used.
"""

from __future__ import annotations

import importlib
import pkgutil

from compress_toolbox.errors import DaflError

_REGISTRY: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: make ``cls`` (a ``Method`` subclass) available as ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
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


def get_method(name: str) -> type:
    """The ``Method`` class registered as ``name``."""
    _load_all()
    if name not in _REGISTRY:
        raise DaflError(f"unknown method {name!r}; choose one of auto, {', '.join(method_names())}")
    return _REGISTRY[name]
