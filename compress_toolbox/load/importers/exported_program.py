"""torch.export archives (.pt2): rebuilt as ordinary layers via ONNX, checked against the program"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.export.pt2_archive.constants import (
    TENSOR_CONSTANT_FILENAME_PREFIX as TENSOR_CONSTANT_PREFIX,
)

from compress_toolbox.errors import ImportFailed, first_line
from compress_toolbox.load.importers.base import (
    FileHead,
    ImportedModel,
    register_importer,
    torch_output_as_warning,
    torch_runner,
    verify,
)
from compress_toolbox.load.importers.torch_to_onnx import module_via_onnx

# Members of the format before torch 2.8, which torch.export.load falls back to (through
# torch.load, unpickling in full when weights-only fails) when the current format fails to load.
LEGACY_PICKLES = ("serialized_state_dict.json", "serialized_constants.json")


def _sniff(info: FileHead) -> bool:
    return info.zip_has("/archive_format") and info.zip_has("/models/model.json")


def _user_inputs(program) -> list:
    """The program's input nodes that the user feeds (not its weights and buffers)."""
    fed = program.graph_signature.user_inputs
    return [node for node in program.graph.nodes if node.op == "placeholder" and node.name in fed]


def _input_shape(program, given, path: Path) -> tuple[int, ...]:
    if given:
        return tuple(given)
    user_inputs = _user_inputs(program)
    if len(user_inputs) != 1:
        raise ImportFailed(f"{path}: the program has {len(user_inputs)} inputs; one is supported")
    value = user_inputs[0].meta.get("val")
    try:
        return tuple(int(dim) for dim in value.shape[1:])
    except (AttributeError, TypeError):
        raise ImportFailed(f"{path}: input shape not recorded; give --input-shape C,H,W") from None


def _static_batch(program) -> int | None:
    """The batch the program was exported at, where its input fixes it (None: dynamic)."""
    user_inputs = _user_inputs(program)
    value = user_inputs[0].meta.get("val") if len(user_inputs) == 1 else None
    batch = getattr(value, "shape", (None,))[0] if getattr(value, "ndim", 0) else None
    return batch if isinstance(batch, int) else None


def in_batches_of(batch: int | None, run: Callable[[np.ndarray], np.ndarray]
                  ) -> Callable[[np.ndarray], np.ndarray]:  # fmt: skip
    """``run`` (numpy -> numpy) applied to a batch of any size in runs of ``batch`` samples,
    the last one padded with zeros: a program whose input fixes its batch (None: as it is)."""
    if batch is None:
        return run

    def chunked(x: np.ndarray) -> np.ndarray:
        outs = []
        for start in range(0, len(x), batch):
            chunk = x[start : start + batch]
            padding = np.zeros((batch - len(chunk), *x.shape[1:]), x.dtype)
            outs.append(run(np.concatenate([chunk, padding]))[: len(chunk)])
        return np.concatenate(outs)

    return chunked


def pickled_members(path: Path) -> list[str]:
    """Archive members that torch.export.load would run code from: weights or constants saved
    with ``use_pickle``, custom/opaque objects, ``.pt`` members (sample inputs, legacy weights
    and constants, the pre-2.8 format it falls back to) that do not load weights-only (torch
    then unpickles them in full), and AOTInductor's compiled code, which it loads as a library.
    Names are compared ignoring case, as torch's zip reader finds them."""
    found = []
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            lower = name.lower()
            if "/data/aotinductor/" in f"/{lower}" and not lower.endswith("/"):
                found.append(f"{name} (compiled code)")
            elif lower.endswith("_config.json") and "/data/" in lower:
                found += [f"{name}: {key}" for key in _pickled_payloads(archive.read(name))]
            elif lower.endswith(".pt") or lower.rsplit("/", 1)[-1] in LEGACY_PICKLES:
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:  # noqa: BLE001 - anything but plain tensors needs trust
                    found.append(name)
    return found


def _pickled_payloads(config_json: bytes) -> list[str]:
    """Keys of a weights/constants config that torch loads by unpickling."""
    try:
        config = json.loads(config_json).get("config", {})
        items = list(config.items())
    except (ValueError, AttributeError):
        return ["(unreadable)"]
    found = []
    for key, meta in items:
        pickled = meta.get("use_pickle") if isinstance(meta, dict) else True
        path_name = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
        if pickled or not path_name.startswith(("weight_", TENSOR_CONSTANT_PREFIX)):
            found.append(str(key))
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
            f"{path}: the archive holds pickled Python objects or compiled code ({pickled[0]}"
            f"{f' and {len(pickled) - 1} more' if len(pickled) > 1 else ''}), which can run "
            "code when loaded; pass --trust-model-code (or its old name --trust-pickle) if you "
            "trust the file"
        )
    said: list[str] = []
    try:
        with torch_output_as_warning(path) as said:  # a failed load logs tracebacks on stderr
            program = torch.export.load(str(path))
    except Exception as error:
        # torch's own message may only point at the log it printed: quote the log's last error
        logged = re.findall(r"(\w+Error: .+)", said[0]) if said else []
        reason = logged[-1][:200] if logged else f"{type(error).__name__}: {first_line(error)}"
        raise ImportFailed(f"{path}: cannot load torch.export archive ({reason})") from None
    shape = _input_shape(program, input_shape, path)
    module = module_via_onnx(program, shape, path, dynamo=True)
    original = in_batches_of(_static_batch(program), torch_runner(program.module()))
    max_abs, max_rel = verify(module, original, shape, path)
    details = {"verified_against": "torch.export.load", "rebuilt_via": "onnx (dynamo exporter)"}
    return ImportedModel(module, shape, max_abs, max_rel, details)
