"""TorchScript archives (torch.jit.save): rebuilt as ordinary layers through ONNX."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import ImportFailed
from .base import FileHead, ImportedModel, random_inputs, register_importer, torch_runner, verify
from .torch_to_onnx import module_via_onnx


def _sniff(info: FileHead) -> bool:
    return info.zip_has("/constants.pkl") and any("/code/" in name for name in info.zip_names)


class _ShapeOnly:
    def __init__(self, size):
        self.size = tuple(size)


class _TracedInputsReader(pickle.Unpickler):
    """Reads only tensor *shapes* from ``traced_inputs.pkl`` (what torch.jit.trace saw)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, *args: _ShapeOnly(size)
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, tag: value
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name.endswith("Storage"):
            return None
        raise pickle.UnpicklingError(f"{module}.{name} not allowed")

    def persistent_load(self, pid):
        return None


def traced_input_shape(path: Path) -> tuple[int, ...] | None:
    """The input shape (without batch) that the module was traced with, if the file records it."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/traced_inputs.pkl"))
            saved = _TracedInputsReader(io.BytesIO(archive.read(name))).load()
        inputs = saved.get("forward") if isinstance(saved, dict) else None
        if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
            return inputs[0].size[1:]
    except Exception:  # not recorded, scripted rather than traced, another layout: ask the user
        return None
    return None


@register_importer("torchscript", _sniff)
def import_torchscript(path: Path, *, input_shape=None, **_unused) -> ImportedModel:
    """Load with torch.jit.load, export to ONNX, convert back to editable layers, verify."""
    try:
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as error:
        raise ImportFailed(f"{path}: cannot load TorchScript archive: {error}") from None
    shape = tuple(input_shape) if input_shape else traced_input_shape(path)
    if not shape:
        raise ImportFailed(
            f"{path}: TorchScript file does not record its input shape; "
            "give it with --input-shape C,H,W"
        )
    try:
        scripted(random_inputs(shape, 1))
    except Exception as error:
        raise ImportFailed(f"{path}: does not run on input shape {shape}: {error}") from None
    module = module_via_onnx(scripted, shape, path, dynamo=False)
    max_abs, max_rel = verify(module, torch_runner(scripted), shape, path)
    details = {"verified_against": "torch.jit.load", "rebuilt_via": "onnx (opset 17)"}
    return ImportedModel(module, shape, max_abs, max_rel, details)
