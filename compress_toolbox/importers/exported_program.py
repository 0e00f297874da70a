"""torch.export archives (.pt2): rebuilt as ordinary layers via ONNX, checked against the program"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path

import torch
from torch.export.pt2_archive.constants import (
    TENSOR_CONSTANT_FILENAME_PREFIX as TENSOR_CONSTANT_PREFIX,
)

from ..errors import ImportFailed, first_line
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


def pickled_members(path: Path) -> list[str]:
    """Archive members that torch.export.load would unpickle with code execution allowed:
    weights or constants saved with ``use_pickle``, custom/opaque objects, and sample inputs
    that do not load weights-only (torch falls back to a full unpickle for those)."""
    found = []
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith("_config.json") and "/data/" in name:
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except (ValueError, AttributeError):
                    found.append(f"{name} (unreadable)")
                    continue
                for key, meta in config.items():
                    pickled = meta.get("use_pickle") if isinstance(meta, dict) else True
                    path_name = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
                    is_tensor = path_name.startswith(("weight_", TENSOR_CONSTANT_PREFIX))
                    if pickled or not is_tensor:
                        found.append(f"{name}: {key}")
            elif "/data/sample_inputs/" in name and not name.endswith("/"):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:  # noqa: BLE001 - anything but plain tensors needs trust
                    found.append(name)
    return found


@register_importer("torch.export", _sniff)
def import_exported_program(
    path: Path, *, input_shape=None, trust_pickle=False, **_unused
) -> ImportedModel:
    """Load with torch.export.load, export to ONNX, convert back to editable layers, verify.

    The archive is checked first: pickled members are loaded only with ``trust_pickle``.
    """
    try:
        pickled = pickled_members(path)
    except (zipfile.BadZipFile, OSError, KeyError) as error:
        raise ImportFailed(f"{path}: damaged torch.export archive ({error})") from None
    if pickled and not trust_pickle:
        raise ImportFailed(
            f"{path}: the archive holds pickled Python objects ({pickled[0]}"
            f"{f' and {len(pickled) - 1} more' if len(pickled) > 1 else ''}), which can run "
            "code when loaded; pass --trust-pickle if you trust the file"
        )
    quiet = logging.getLogger("torch._export.serde.serialize")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its weights-only fallback logs a long traceback
    try:
        program = torch.export.load(str(path))
    except Exception as error:
        first = first_line(error)
        raise ImportFailed(
            f"{path}: cannot load torch.export archive ({type(error).__name__}: {first})"
        ) from None
    finally:
        quiet.setLevel(level)
    shape = _input_shape(program, input_shape, path)
    module = module_via_onnx(program, shape, path, dynamo=True)
    max_abs, max_rel = verify(module, torch_runner(program.module()), shape, path)
    details = {"verified_against": "torch.export.load", "rebuilt_via": "onnx (dynamo exporter)"}
    return ImportedModel(module, shape, max_abs, max_rel, details)
