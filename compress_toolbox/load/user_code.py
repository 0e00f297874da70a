"""Python objects the user names by ``file.py:Name`` or ``package.module:Name`` (--model-class's
model class, --decode's decoding function). Running the file is what the user asked for by
naming it; nothing else the run reads may run code. The file runs as ``python FILE`` would run
it, its folder importable (a model file importing its own layers from beside it)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compress_toolbox.errors import DaflError, first_line

# files run so far in this process, by (resolved path, mtime, size): one file named by
# --model-class and by --decode runs once, so that both see the same module (one set of
# globals); later runs in the same process (the Python API called again) reuse it too, unless
# the file changed
_RUN: dict[tuple[Path, int, int], Any] = {}


def user_file(spec: str | None) -> Path | None:
    """The file ``spec`` names (``file.py:Name``, or ``pkg.mod:Name`` found in the working
    folder), without running it; None when it names no local file."""
    if not spec or ":" not in spec:
        return None
    location = spec.rpartition(":")[0]
    if location.endswith(".py"):
        return Path(location)
    local = Path(*location.split(".")).with_suffix(".py")
    return local if local.is_file() else None


def load_object(spec: str, option: str, error: type[DaflError] = DaflError) -> Any:
    """The object ``Name`` of ``file.py:Name`` or ``package.module:Name`` (the working folder
    importable, as ``python -m`` makes it). ``error`` (one line starting with ``option``) when
    the file is missing, fails to run, or has no such name."""
    location, _, name = spec.rpartition(":")
    if not location or not name:
        raise error(f"{option} {spec!r}: not 'file.py:Name' or 'package.module:Name'")
    module = _run_file(Path(location), option, error) if location.endswith(".py") \
        else _import(location, option, error)  # fmt: skip
    if not hasattr(module, name):
        raise error(f"{option}: {location} has no {name}")
    return getattr(module, name)


def _run_file(file: Path, option: str, error: type[DaflError]) -> Any:
    if not file.is_file():
        raise error(f"{option}: no such file {file}")
    stat = file.stat()
    key = (file.resolve(), stat.st_mtime_ns, stat.st_size)
    if key in _RUN:
        return _RUN[key]
    name = f"_dafl_user_{len(_RUN)}_{file.stem}"  # two files of one name stay apart
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        with _importable(file.resolve().parent):  # its own modules beside it, as python runs it
            module_spec.loader.exec_module(module)
    except Exception as caught:
        del sys.modules[name]
        raise error(f"{option}: cannot run {file}: {first_line(caught)}") from None
    _RUN[key] = module
    return module


@contextlib.contextmanager
def _importable(folder: Path | str) -> Iterator[None]:
    """``folder`` first on ``sys.path`` meanwhile, as python puts a script's folder, then last
    for the rest of the process: an import the user's code makes later (inside ``forward``,
    or unpickling) still finds its modules, and never shadows a library imported after."""
    folder = str(folder)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)  # the first occurrence: the one inserted above
        if folder not in sys.path:
            sys.path.append(folder)


def _import(location: str, option: str, error: type[DaflError]) -> Any:
    folder = "" if "" in sys.path else os.getcwd()
    try:
        with _importable(folder):
            return importlib.import_module(location)
    except Exception as caught:
        raise error(f"{option}: cannot import {location}: {first_line(caught)}") from None
