"""Stage 1: load a teacher from any supported file format, verified against the original."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_toolbox.errors import ImportFailed
from compress_toolbox.limits import LimitExceeded, bounded
from compress_toolbox.load.analysis import Analysis, analyse
from compress_toolbox.load.importers import detect_format, get_importer
from compress_toolbox.load.importers.base import CHANNELS_LAST, ImportedModel
from compress_toolbox.tasks.outputs import JoinedOutputs, join_kind_of, joined_details, tensors_of

IMPORT_TIME_LIMIT_S = 300  # a 10,000-node graph imports in seconds; a hang never ends


@dataclass
class Teacher:
    """A loaded teacher: an editable ``nn.Module`` (eval mode) plus what we know about it."""

    module: nn.Module
    input_shape: tuple[int, ...]  # (C, H, W) or (features,), without the batch dimension
    num_outputs: int
    format: str
    source: Path
    analysis: Analysis
    max_abs_diff: float = 0.0  # imported module vs the original, on random inputs
    max_rel_diff: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def channels_last(self) -> bool:
        """Whether the teacher's file takes its images channels last, (N, H, W, C), as
        TensorFlow models do (``module`` takes them channels first, as every model here)."""
        return self.details.get("input_layout") == CHANNELS_LAST

    @classmethod
    def from_module(cls, module: nn.Module, input_shape: tuple[int, ...]) -> Teacher:
        """Wrap an in-memory module (no file, no import check): handy from Python and in tests."""
        module = module.eval()
        analysis = analyse(module, tuple(input_shape))
        return cls(
            module, tuple(input_shape), analysis.num_outputs, "module", Path("<module>"), analysis
        )


def load_teacher(
    path: str | Path,
    *,
    model_class: str | None = None,
    model_kwargs: dict[str, Any] | str | None = None,
    input_shape: tuple[int, ...] | str | None = None,
    trust_pickle: bool = False,
    join_outputs: bool = False,
) -> Teacher:
    """Load ``path`` (ONNX, TorchScript, torch.export ``.pt2``, a PyTorch checkpoint, or a
    TensorFlow/Keras model: ``.keras``, ``.h5``, SavedModel folder, frozen ``.pb``, checkpoint
    ``.meta``/``.index``, ``.tflite``).

    The file's format is detected from its content. The imported module is compared with the
    original on random inputs at batch 1 and 3; a relative difference above 1e-4 raises
    ``VerificationFailed``. Any problem with the file raises ``ImportFailed`` naming it.
    A file with several outputs gives its main one; with ``join_outputs`` (a detection head's
    boxes and scores) several (N, A, C) outputs are joined along their last axis instead, a
    YOLO head's per-level outputs (channels first or last) along the locations, a decoded
    YOLO output with its
    levels' rows beside it, and a head's levels given in parts or as rows each level's parts
    along the channels first (``tasks.outputs.JOIN_KINDS``).
    """
    path = Path(path)
    if not path.exists():
        raise ImportFailed(f"{path}: no such file")
    if path.is_file() and path.stat().st_size == 0:
        raise ImportFailed(f"{path}: file is empty")
    if isinstance(model_kwargs, str):
        try:
            model_kwargs = json.loads(model_kwargs)
        except json.JSONDecodeError as error:
            raise ImportFailed(f"--model-kwargs is not valid JSON: {error}") from None
    if isinstance(input_shape, str):
        input_shape = parse_shape(input_shape)

    file_format = detect_format(path)
    try:
        with bounded(IMPORT_TIME_LIMIT_S, None):
            imported = get_importer(file_format)(
                path,
                model_class=model_class,
                model_kwargs=model_kwargs or {},
                input_shape=tuple(input_shape) if input_shape else None,
                trust_pickle=trust_pickle,
                **({"join_outputs": True} if join_outputs else {}),
            )
    except LimitExceeded as error:
        raise ImportFailed(f"{path}: importing the {file_format} file {error} (the bound for "
                           "one import); is the graph unusually large?") from None  # fmt: skip
    if join_outputs and join_kind_of(imported.details) is None:
        imported = _joined(imported)
    module = in_float32(imported.module).eval()
    analysis = analyse(module, imported.input_shape)
    return Teacher(
        module=module,
        input_shape=imported.input_shape,
        num_outputs=analysis.num_outputs,
        format=file_format,
        source=path,
        analysis=analysis,
        max_abs_diff=imported.max_abs_diff,
        max_rel_diff=imported.max_rel_diff,
        details=imported.details,
    )


@torch.no_grad()
def _joined(imported: ImportedModel) -> ImportedModel:
    """A module returning several tensors (a tuple, list or dict) made to return them as one
    (``JoinedOutputs``, as ``joined_details`` reads their shapes); any other module as it
    is."""
    out = imported.module.eval()(torch.zeros(1, *imported.input_shape))
    tensors = tensors_of(out) if isinstance(out, (dict, list, tuple)) else {}
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else () for t in tensors.values()]
    joined = joined_details(list(tensors), shapes)
    if joined is None:
        return imported
    module = JoinedOutputs(imported.module, join_kind_of(joined)).eval()
    return replace(imported, module=module, details={**imported.details, **joined})


LOW_PRECISION = (torch.float16, torch.bfloat16)


def in_float32(module: nn.Module) -> nn.Module:
    """``module`` computing in float32 when its weights or casts are float16/bfloat16: training
    in half precision overflows at the first step (a NaN KD loss was measured on a float16 conv
    net), and a float32 teacher is at least as accurate as its half-precision file."""
    tensors = [*module.parameters(), *module.buffers()]
    casts = [m for m in module.modules() if getattr(m, "torch_dtype", None) in LOW_PRECISION]
    if not casts and all(t.dtype not in LOW_PRECISION for t in tensors):
        return module
    for cast in casts:  # onnx2torch's Cast(to=FLOAT16) modules
        cast.torch_dtype = torch.float32
    return module.float()


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,28,28' -> (1, 28, 28)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise ImportFailed(f"input shape {text!r} is not a list of integers like 1,28,28") from None
    if not shape or any(dim <= 0 for dim in shape):
        raise ImportFailed(f"input shape {text!r} must be positive integers like 1,28,28")
    return shape
