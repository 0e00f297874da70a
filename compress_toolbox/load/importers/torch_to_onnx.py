"""Rebuild ordinary layers from a ScriptModule or ExportedProgram by a round trip through ONNX.

Not an importer itself (it registers nothing): torchscript.py and exported_program.py share it.
"""

from __future__ import annotations

import io
import warnings
from functools import partial
from pathlib import Path

import onnx
import torch
from torch import nn

from compress_toolbox.errors import ImportFailed
from compress_toolbox.export.onnx_inspect import fixed_batch
from compress_toolbox.export.onnxscript_adapter import optimize_keeping_batchnorm
from compress_toolbox.export.writer import LEGACY_OPSET
from compress_toolbox.limits import is_out_of_memory
from compress_toolbox.load.graph.decompositions import legacy_adaptive_pools
from compress_toolbox.load.graph.fixed_batch import free_batch
from compress_toolbox.load.graph.onnx_compat import onnx_to_torch, prepare_onnx_model
from compress_toolbox.load.importers.base import random_inputs


def module_via_onnx(model, input_shape: tuple[int, ...], source: Path, dynamo: bool) -> nn.Module:
    """Export ``model`` to ONNX in memory with a dynamic batch and convert it to a GraphModule.

    BatchNorm layers are kept (not folded into the convolutions), so that the BatchNorm-
    statistics prior can use them and students keep them. A list the model returns becomes
    separate outputs (``_sequences_as_outputs``).
    """
    example = random_inputs(input_shape, 2)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                proto = optimize_keeping_batchnorm(_dynamo_export(model, example).model_proto)
                if isinstance(model, torch.export.ExportedProgram):  # verified by its importer
                    proto = _batch_freed(proto)
            else:
                with legacy_adaptive_pools(LEGACY_OPSET) as custom_opsets:
                    torch.onnx.export(
                        model,
                        (example,),
                        buffer,
                        dynamo=False,
                        opset_version=LEGACY_OPSET,
                        custom_opsets=custom_opsets,
                        # PRESERVE (the module is in eval mode) skips Conv+BatchNorm fusion
                        training=torch.onnx.TrainingMode.PRESERVE,
                        input_names=["input"],
                        output_names=["output"],
                        dynamic_axes={"input": {0: "batch"}},
                    )
                proto = _sequences_as_outputs(onnx.load_from_string(buffer.getvalue()))
    except ImportFailed:
        raise
    except Exception as error:
        raise ImportFailed(f"{source}: cannot rebuild editable layers via ONNX: {error}") from None
    return onnx_to_torch(prepare_onnx_model(proto), source, input_shape).eval()


def _batch_freed(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with its batch freed (``fixed_batch.free_batch``) where its input fixes one:
    an ExportedProgram saved at a static batch is exported at that batch, its ``view``s
    reshaping to [B, ...]. Whether the freed graph computes other batches is for the caller's
    verification (exported_program.py's, at batches 1 and 3) to say."""
    batch = fixed_batch(proto)
    return free_batch(proto, batch)[0] if batch else proto


def _sequences_as_outputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` (in place) with each output that a SequenceConstruct makes (a list the model
    returns: YOLOv5's ``(decoded, [levels])``) given as the tensors it holds, in order, which
    onnx2torch can read."""
    graph = proto.graph
    read = {name for node in graph.node for name in node.input}
    makers = {node.output[0]: node for node in graph.node
              if node.op_type == "SequenceConstruct" and node.output[0] not in read}  # fmt: skip
    if not any(out.name in makers for out in graph.output):
        return proto
    outputs, named = [], {out.name for out in graph.output}
    for out in graph.output:
        node = makers.get(out.name)
        if node is None:
            outputs.append(out)
            continue
        graph.node.remove(node)
        outputs.extend(onnx.helper.make_empty_tensor_value_info(name)
                       for name in node.input if name not in named)  # fmt: skip
    del graph.output[:]
    graph.output.extend(outputs)
    return proto


def _dynamo_export(model, example: torch.Tensor):
    """torch.onnx.export (dynamo) of ``model``, its batch dynamic where the model allows it.

    A batch fixed at the example's size is written into constants such as a Resize's output
    sizes (torchvision's FPN upsampling), which then fail at any other batch; a model whose code
    fixes the batch itself is exported as it is. An ExportedProgram keeps its own shapes.
    """
    export = partial(torch.onnx.export, model, (example,), dynamo=True, verbose=False,
                     optimize=False)  # fmt: skip
    if isinstance(model, nn.Module):
        try:
            return export(dynamic_shapes=({0: torch.export.Dim("batch")},))
        except Exception as error:  # e.g. the model's code fixes the batch: export it as it is
            if is_out_of_memory(error):
                raise
    return export()
