"""Shared pieces of the importers: the registry, format detection and numeric verification."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..analysis import output_tensor
from ..errors import ImportFailed, VerificationFailed
from ..verification import TOLERANCE, compare, random_inputs

VERIFY_RTOL = TOLERANCE["float32"]  # max |imported - original| / max |original|
VERIFY_BATCHES = (1, 3)
DYNAMIC_BATCH_CHECK = 7


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


Importer = Callable[..., ImportedModel]
_IMPORTERS: dict[str, tuple[Callable[[FileHead], bool], Importer]] = {}


def register_importer(name: str, sniff: Callable[[FileHead], bool]):
    """Register ``importer(path, *, model_class, model_kwargs, input_shape, trust_pickle)``."""

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
    zip_names: list[str] = []
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                zip_names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise ImportFailed(f"{path}: damaged zip archive ({error})") from None
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
        source=source, what="imported model", batches=VERIFY_BATCHES, rtol=rtol,
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
