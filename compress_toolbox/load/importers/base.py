"""Shared pieces of the importers: the registry, format detection and numeric verification."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress_toolbox.errors import ImportFailed, VerificationFailed
from compress_toolbox.export.verification import (
    IMPORT_BATCHES,
    TOLERANCE,
    compare,
    random_inputs,
)
from compress_toolbox.load.analysis import output_tensor
from compress_toolbox.load.importers.archive_safety import checked_member_names, is_model_zip

VERIFY_RTOL = TOLERANCE["float32"]  # max |imported - original| / max |original|
DYNAMIC_BATCH_CHECK = 7  # an import must run at a batch it was not compared at
# details["input_layout"] of a file taking images channels last (TensorFlow's); the imported
# module takes them channels first, as every module here
CHANNELS_LAST = "channels last (N, H, W, C)"


@dataclass
class ImportedModel:
    module: nn.Module  # ordinary layers, eval mode
    input_shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class FileHead:
    """What format sniffers look at: the first bytes and, for zip archives, the member names."""

    path: Path
    head: bytes
    zip_names: list[str]

    def zip_has(self, suffix: str) -> bool:
        return any(name.endswith(suffix) for name in self.zip_names)

    def is_legacy_torch_save(self) -> bool:
        """A legacy (non-zip) ``torch.save`` file: a pickle (first byte 0x80, PROTO) whose first
        object is torch's magic number, after a 9-byte FRAME header at protocol 4 and above. The
        first byte alone is not enough: one corrupt file in 256 starts with it. (Protocols 0 and
        1 are not recognised; torch's weights-only loader refuses them anyway.)"""
        return self.head[:1] == b"\x80" and _TORCH_SAVE_MAGIC in self.head[:32]


# the pickled integer 0x1950A86A20F9469CFC6C (LONG1, 10 bytes) that legacy torch.save writes first
_TORCH_SAVE_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


Importer = Callable[..., ImportedModel]
_IMPORTERS: dict[str, tuple[Callable[[FileHead], bool], Importer]] = {}


def register_importer(name: str, sniff: Callable[[FileHead], bool]):
    """Register ``importer(path, *, model_class, model_kwargs, input_shape, trust_pickle)``;
    ``join_outputs=True`` is added when a task reads several outputs as one (an importer that
    cannot join them keeps its main output and ignores it)."""

    if name in _IMPORTERS:
        raise ValueError(f"importer {name!r} is already registered")

    def decorator(importer: Importer) -> Importer:
        _IMPORTERS[name] = (sniff, importer)
        return importer

    return decorator


def list_formats() -> list[str]:
    return list(_IMPORTERS)


def get_importer(name: str) -> Importer:
    try:
        return _IMPORTERS[name][1]
    except KeyError:
        raise ImportFailed(f"unknown format {name!r}; known: {', '.join(_IMPORTERS)}") from None


def detect_format(path: Path) -> str:
    """Name of the registered format whose sniffer accepts the file's content (or the folder:
    a TensorFlow SavedModel)."""
    head = b""
    if path.is_file():
        with open(path, "rb") as handle:
            head = handle.read(64)
    # Zip archives are checked here, once for every format, before any importer reads a member.
    zip_names = checked_member_names(path) if is_model_zip(path, head) else []
    info = FileHead(path, head, zip_names)
    for name, (sniff, _) in _IMPORTERS.items():
        if sniff(info):
            return name
    if path.is_dir():
        raise ImportFailed(f"{path}: is a directory, expected a model file or a SavedModel folder")
    raise ImportFailed(
        f"{path}: not a model file this tool reads (expected ONNX, TorchScript, "
        "torch.export .pt2, a PyTorch checkpoint, or a TensorFlow/Keras model)"
    )


@contextlib.contextmanager
def torch_output_as_warning(source: Path) -> Iterator[list[str]]:
    """Hold back what torch prints while it reads ``source`` (C++ warnings written straight to
    file descriptor 2, its Python log on ``sys.stderr``) and issue it afterwards, also when the
    block fails, as one RuntimeWarning, which the CLI shows only with --debug. The list it
    yields receives that text on exit, for an error message to quote. Python warnings raised
    inside keep their category and are re-issued as they were."""
    if sys.stderr is not None:  # None in a windowed interpreter
        sys.stderr.flush()
    caught: list[warnings.WarningMessage] = []
    said: list[str] = []
    try:
        with tempfile.TemporaryFile() as native, warnings.catch_warnings(record=True) as caught:
            saved = _redirect_fd(2, native.fileno())
            logged = io.StringIO()
            try:
                with contextlib.redirect_stderr(logged):
                    yield said
            finally:
                if saved is not None:
                    os.dup2(saved, 2)
                    os.close(saved)
                native.seek(0)
                text = (native.read().decode(errors="replace") + logged.getvalue()).strip()
                said.extend([text] if text else [])
    finally:
        for item in caught:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
        for text in said:
            warnings.warn(f"{source}: torch printed while reading it:\n{text}", RuntimeWarning, 3)


def _redirect_fd(fd: int, target: int) -> int | None:
    """Point ``fd`` at ``target``; returns a copy of the old one to restore (None: no ``fd``,
    as in a windowed interpreter, so there is nothing to redirect)."""
    try:
        saved = os.dup(fd)
    except OSError:
        return None
    os.dup2(target, fd)
    return saved


def verify(
    imported: nn.Module,
    original: Callable[[np.ndarray], np.ndarray],
    input_shape: tuple[int, ...],
    source: Path,
    rtol: float = VERIFY_RTOL,
) -> tuple[float, float]:
    """Compare ``imported`` with ``original`` at batch 1 and 3 (verification.compare), and
    check it runs at batch 7. Returns (max abs diff, max relative diff)."""
    imported.eval()
    max_abs, max_rel = compare(
        torch_runner(imported), original, input_shape,
        source=source, what="imported model", batches=IMPORT_BATCHES, rtol=rtol,
    )  # fmt: skip
    try:
        with torch.no_grad():
            out = output_tensor(imported(random_inputs(input_shape, DYNAMIC_BATCH_CHECK)))
    except Exception as error:
        raise VerificationFailed(
            f"{source}: imported model does not run at batch {DYNAMIC_BATCH_CHECK} "
            f"(the file may have a fixed batch size): {error}"
        ) from error
    if out.shape[0] != DYNAMIC_BATCH_CHECK:
        raise VerificationFailed(f"{source}: imported model's batch dimension is fixed")
    return max_abs, max_rel


def torch_runner(module: Callable) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a torch callable (ScriptModule, exported program, nn.Module) as numpy -> numpy."""

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return output_tensor(module(torch.from_numpy(x))).float().numpy()

    return run
