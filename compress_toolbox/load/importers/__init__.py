"""Importer registry: one module per teacher file format, each registering itself.

Adding a format means adding one file here that defines a ``sniff`` function (does this file look
like my format?) and an importer decorated with ``@register_importer(name, sniff)``; every module in
this package is imported automatically, except private helpers (a leading underscore, such as
``_tf_process/``, the TensorFlow converter, which runs in its own process).
"""

from __future__ import annotations

import importlib
import pkgutil

from compress_toolbox.load.importers.base import (
    ImportedModel,
    detect_format,
    get_importer,
    list_formats,
    register_importer,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ImportedModel", "detect_format", "get_importer", "list_formats", "register_importer"]
