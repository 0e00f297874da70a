"""Rebuild ordinary layers from a ScriptModule or ExportedProgram by a round trip through ONNX.

Not an importer itself (it registers nothing): torchscript.py and exported_program.py share it.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import ImportFailed
from ..onnx_compat import onnx_to_torch, prepare_onnx_model
from .base import random_inputs

LEGACY_OPSET = 17


def module_via_onnx(model, input_shape: tuple[int, ...], source: Path, dynamo: bool) -> nn.Module:
    """Export ``model`` to ONNX in memory with a dynamic batch and convert it to a GraphModule."""
    example = random_inputs(input_shape, 2)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                program = torch.onnx.export(
                    model, (example,), dynamo=True, verbose=False, optimize=True
                )
                proto = program.model_proto
            else:
                torch.onnx.export(
                    model,
                    (example,),
                    buffer,
                    dynamo=False,
                    opset_version=LEGACY_OPSET,
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_axes={"input": {0: "batch"}},
                )
                proto = onnx.load_from_string(buffer.getvalue())
    except ImportFailed:
        raise
    except Exception as error:
        raise ImportFailed(f"{source}: cannot rebuild editable layers via ONNX: {error}") from None
    return onnx_to_torch(prepare_onnx_model(proto), source, input_shape).eval()
