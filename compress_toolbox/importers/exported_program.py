"""torch.export archives (.pt2): rebuilt as ordinary layers via ONNX, checked against the program"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ImportFailed
from .base import FileHead, ImportedModel, register_importer, torch_runner, verify
from .torch_to_onnx import module_via_onnx


def _sniff(info: FileHead) -> bool:
    return info.zip_has("/archive_format") and info.zip_has("/models/model.json")


def _input_shape(program, given, path: Path) -> tuple[int, ...]:
    if given:
        return tuple(given)
    user_inputs = [
        node
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
    ]
    if len(user_inputs) != 1:
        raise ImportFailed(f"{path}: the program has {len(user_inputs)} inputs; one is supported")
    value = user_inputs[0].meta.get("val")
    try:
        return tuple(int(dim) for dim in value.shape[1:])
    except (AttributeError, TypeError):
        raise ImportFailed(f"{path}: input shape not recorded; give --input-shape C,H,W") from None


@register_importer("torch.export", _sniff)
def import_exported_program(path: Path, *, input_shape=None, **_unused) -> ImportedModel:
    """Load with torch.export.load, export to ONNX, convert back to editable layers, verify."""
    try:
        program = torch.export.load(str(path))
    except Exception as error:
        raise ImportFailed(f"{path}: cannot load torch.export archive: {error}") from None
    shape = _input_shape(program, input_shape, path)
    module = module_via_onnx(program, shape, path, dynamo=True)
    max_abs, max_rel = verify(module, torch_runner(program.module()), shape, path)
    details = {"verified_against": "torch.export.load", "rebuilt_via": "onnx (dynamo exporter)"}
    return ImportedModel(module, shape, max_abs, max_rel, details)
