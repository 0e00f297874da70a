"""ONNX files (any producer, opsets 11-22, external data), verified against onnxruntime."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import torch

from compress_toolbox.errors import ImportFailed
from compress_toolbox.export.onnx_inspect import dim_size
from compress_toolbox.export.onnx_names import GraphAdditions
from compress_toolbox.export.verification import tolerance_for
from compress_toolbox.export.writer import onnx_session, run_batched
from compress_toolbox.load.graph.fixed_batch import free_batch
from compress_toolbox.load.graph.onnx_cleanup import clean_up
from compress_toolbox.load.graph.onnx_compat import onnx_to_torch, opset_version, prepare_onnx_model
from compress_toolbox.load.importers.base import FileHead, ImportedModel, register_importer, verify
from compress_toolbox.load.importers.onnx_checks import check_model, check_raw_outputs
from compress_toolbox.tasks import FILE_OUTPUTS, SigmoidAsTwoClasses
from compress_toolbox.tasks.detection.heads import joined_layout
from compress_toolbox.tasks.outputs import (
    JOIN_KINDS,
    channels_first,
    join_kind_of,
    join_tensors,
    joined_details,
    level_cells,
    level_slices,
    row_level_groups,
)


def _parse(path: Path, load_external_data: bool) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except FileNotFoundError as error:
        raise ImportFailed(
            f"{path}: external data file missing: {error.filename or error}"
        ) from None
    except onnx.checker.ValidationError as error:
        if "external" in str(error) or "should be stored" in str(error):
            raise ImportFailed(f"{path}: external data file missing: {error}") from None
        raise ImportFailed(f"{path}: not a valid ONNX model: {error}") from None
    except Exception as error:  # protobuf DecodeError and friends
        raise ImportFailed(
            f"{path}: not a valid ONNX model (truncated or corrupt: {type(error).__name__})"
        ) from None
    if model.ir_version <= 0 or not model.graph.node:
        raise ImportFailed(f"{path}: not a valid ONNX model (no graph)")
    return model


def _sniff(info: FileHead) -> bool:
    if info.zip_names or info.is_legacy_torch_save():  # a torch format
        return False
    if info.path.suffix.lower() == ".onnx":
        return True
    if info.head[:1] == b"\x80":
        return False  # some other pickle: not worth parsing whole (ONNX starts with 0x08)
    try:
        _parse(info.path, load_external_data=False)
    except ImportFailed:
        return False
    return True


def _graph_input(model: onnx.ModelProto, path: Path) -> onnx.ValueInfoProto:
    initializers = {init.name for init in model.graph.initializer}
    inputs = [inp for inp in model.graph.input if inp.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(inp.name for inp in inputs)
        raise ImportFailed(
            f"{path}: the model has {len(inputs)} inputs ({names}); one is supported"
        )
    return inputs[0]


def _image_size_in_metadata(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(H, W) from ultralytics' ``imgsz`` metadata ("[320, 320]" or "640"), else None."""
    text = next((p.value for p in model.metadata_props if p.key == "imgsz"), None)
    try:
        value = ast.literal_eval(text) if text else None
    except (ValueError, SyntaxError):
        return None
    sizes = [value, value] if isinstance(value, int) else value
    if isinstance(sizes, (list, tuple)) and len(sizes) == 2 and all(
            isinstance(v, int) and v > 0 for v in sizes):  # fmt: skip
        return int(sizes[0]), int(sizes[1])
    return None


def _check_given_shape(given: tuple[int, ...], dims, name: str, path: Path) -> None:
    """ImportFailed, naming what the file declares, when ``--input-shape`` has another number
    of dimensions than the input takes after its batch, or differs from a size it fixes."""
    declared = [dim_size(d) for d in dims[1:]]
    if not dims or (len(given) == len(declared) and all(
            d is None or d <= 0 or d == g for d, g in zip(declared, given))):  # fmt: skip
        return
    text = ",".join("?" if d is None or d <= 0 else str(d) for d in declared)
    form = "C,H,W" if len(declared) == 3 else f"{len(declared)} numbers"
    raise ImportFailed(
        f"{path}: --input-shape {','.join(map(str, given))} does not fit input '{name}', which "
        f"takes ({text}) after the batch; give {form}"
    )


def _input_shape(model: onnx.ModelProto, graph_input: onnx.ValueInfoProto, given, path: Path):
    """(C, H, W) from the ONNX input, the batch dimension dropped; ``given`` wins if set, and a
    dynamic height and width come from the file's ``imgsz`` metadata (ultralytics) if any."""
    dims = graph_input.type.tensor_type.shape.dim
    fixed_batch = dim_size(dims[0]) if dims else None
    if given:
        _check_given_shape(tuple(given), dims, graph_input.name, path)
        return tuple(given), fixed_batch
    shape = [dim_size(d) for d in dims[1:]]
    image_size = _image_size_in_metadata(model)
    if len(shape) == 3 and shape[0] and image_size and not any(shape[1:]):
        shape[1:] = image_size
    if not dims or any(dim is None or dim <= 0 for dim in shape):
        raise ImportFailed(
            f"{path}: input '{graph_input.name}' has no fixed shape beyond the batch "
            f"({[d.dim_param or d.dim_value for d in dims]}); give it with --input-shape C,H,W"
        )
    return tuple(shape), fixed_batch


PROBABILITY_OPS = ("Softmax", "LogSoftmax", "Sigmoid", "ArgMax", "TopK")


def _pick_output(model: onnx.ModelProto, path: Path) -> tuple[str, list[str]]:
    """The output to distill: the only one, or the first not computed by a probability-like op
    (a classifier exported with both logits and probabilities keeps its logits); and the other
    outputs that are not probabilities either (a detector's second head), which the student
    will not have. Other outputs are dropped from the (copied) graph."""
    outputs = [out.name for out in model.graph.output]
    if len(outputs) == 1:
        return outputs[0], []
    producers = {name: node.op_type for node in model.graph.node for name in node.output}
    logits = [name for name in outputs if producers.get(name) not in PROBABILITY_OPS]
    if not logits:
        raise ImportFailed(
            f"{path}: all {len(outputs)} outputs ({', '.join(outputs)}) are probabilities or "
            "indices; export the model with its logits as an output"
        )
    keep = next(out for out in model.graph.output if out.name == logits[0])
    del model.graph.output[:]
    model.graph.output.append(keep)
    return keep.name, logits[1:]


JOINED_OUTPUT = "joined_outputs"


def _join_outputs(model: onnx.ModelProto, path: Path,
                  shape: tuple[int, ...]) -> tuple[str, dict]:  # fmt: skip
    """Join every output of ``model`` (in place) into one, as ``join_tensors`` joins them: a
    detection head's boxes (N, A, B) and scores (N, A, K) along the last axis, (N, A, B + K);
    a YOLO head's per-level outputs as rows along the locations (``level_rows``; channels
    last, each cell's channels as its row), given in
    parts each level's parts along the channels first; a decoded YOLO output and its levels'
    rows side by side; a head's levels given as rows (N, A_l, C_i), each level's outputs along
    the channels, then the levels along the locations. Returns the joined output's name and the
    details to record (``joined_details``); ImportFailed, naming the outputs, when they are
    none of these."""
    names, shapes = _output_shapes(model, shape)
    joined = joined_details(names, shapes)
    if joined is None:
        seen = ", ".join(f"{n} (N, {', '.join(map(str, s[1:]))})" for n, s in zip(names, shapes))
        raise ImportFailed(f"{path}: outputs {seen} cannot be read as one detection head: "
                           "several outputs must each be (N, A, C) with the same A, or a YOLO "
                           "head's levels, (N, anchors, h, w, C), (N, anchors * C, h, w) or "
                           "(N, h, w, anchors * C) with one C, or a decoded (N, A, C) output "
                           "followed by (N, anchors, h, w, C) levels, or levels given in "
                           "parts (N, C_i, h, w) or as rows (N, A, C_i), the same parts per "
                           "level")  # fmt: skip
    add = GraphAdditions(model.graph)
    kind = join_kind_of(joined)
    if kind == "channels":
        output = add.node("Concat", names, JOINED_OUTPUT, axis=-1)
    elif kind == "levels":
        rows = [_level_rows_nodes(add, n, s[1:]) for n, s in zip(names, shapes)]
        output = add.node("Concat", rows, JOINED_OUTPUT, axis=1)
    elif kind == "levels_last":
        rows = [_level_rows_nodes(add, n, s[1:], channels_last=True) for n, s in zip(names, shapes)]
        output = add.node("Concat", rows, JOINED_OUTPUT, axis=1)
    elif kind == "parts":
        levels = _join_level_parts(add, names, shapes)
        rows = [_level_rows_nodes(add, n, s) for n, s in levels]
        output = add.node("Concat", rows, JOINED_OUTPUT, axis=1)
    elif kind == "rows":
        rows = [add.node("Concat", [names[i] for i in level], f"{names[level[0]]}_level", axis=-1)
                for level in row_level_groups(shapes)]  # fmt: skip
        output = add.node("Concat", rows, JOINED_OUTPUT, axis=1)
    else:
        rows = [_level_rows_nodes(add, n, s[1:]) for n, s in zip(names[1:], shapes[1:])]
        beside = add.node("Concat", rows, f"{JOINED_OUTPUT}_level_rows", axis=1)
        output = add.node("Concat", [names[0], beside], JOINED_OUTPUT, axis=-1)
    del model.graph.output[:]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    return output, joined


def _join_level_parts(add: GraphAdditions, names: list[str], shapes: list[tuple[int, ...]]
                      ) -> list[tuple[str, tuple[int, ...]]]:  # fmt: skip
    """Nodes (``add``) joining each level's parts along the channels, as ``parts_joined``
    does; each level's (name, shape without the batch)."""
    levels = []
    for level in level_slices(shapes):
        parts, level_shapes = names[level], shapes[level]
        name = add.node("Concat", parts, f"{parts[0]}_level", axis=1)
        levels.append((name, (sum(s[1] for s in level_shapes), *level_shapes[0][2:])))
    return levels


def _output_shapes(model: onnx.ModelProto,
                   shape: tuple[int, ...]) -> tuple[list[str], list[tuple[int, ...]]]:  # fmt: skip
    """``model``'s output names and the shapes they have at batch 1 on ``shape`` (no batch)."""
    session = onnx_session(model.SerializeToString())
    x = np.zeros((1, *shape), dtype=np.float32)
    results = session.run(None, {session.get_inputs()[0].name: x})
    return [out.name for out in model.graph.output], [tuple(r.shape) for r in results]


def _one_detection_head(model: onnx.ModelProto, shape: tuple[int, ...]) -> bool:
    """Whether ``model``'s several outputs are what --task detection reads as one head: boxes
    and scores, or a YOLO head's levels (alone, beside their decoded output or in parts) on
    grids of stride 8 or more (a segmentation model's deep supervision maps, a pyramid too,
    are finer). A hint only: False where the probe cannot run or the head reader refuses the
    outputs."""
    try:
        joined = joined_details(*_output_shapes(model, shape)) or {}
        kind = join_kind_of(joined)
        if kind is None or joined_layout(joined) is None:
            return False
    except Exception:  # noqa: BLE001 - the import itself reports what is wrong with the file
        return False
    if kind in ("channels", "rows"):
        return True
    levels = joined[JOIN_KINDS[kind]][1:] if kind == "beside" else joined[JOIN_KINDS[kind]]
    first = [channels_first(tuple(s)) if kind == "levels_last" else tuple(s) for _, s in levels]
    return all(cell * 8 <= size for level in first
               for cell, size in zip(level_cells(level), shape[-2:]))


def _level_rows_nodes(add: GraphAdditions, name: str, shape: tuple[int, ...],
                      channels_last: bool = False) -> str:  # fmt: skip
    """Nodes (``add``) giving per-level output ``name`` of ``shape`` (no batch) as rows, as
    ``level_rows`` does; returns the rows' name."""
    if len(shape) == 4 or channels_last:  # (N, na, h, w, C) or (N, h, w, C): (N, -1, C)
        return add.node("Reshape", [name, add.const(f"{name}_rows_shape", [0, -1, shape[-1]])],
                        f"{name}_rows")  # fmt: skip
    flat = add.node("Reshape", [name, add.const(f"{name}_flat_shape", [0, shape[0], -1])],
                    f"{name}_flat")  # fmt: skip
    return add.node("Transpose", [flat], f"{name}_rows", perm=[0, 2, 1])


def _cut_final_activation(model: onnx.ModelProto, output: str) -> str | None:
    """When ``output`` is a Softmax over the classes or a one-channel Sigmoid, make the
    activation's input the graph's output (in place) and return the op's name: distillation
    needs logits, and the probabilities of a confident teacher (0.994) read as logits say it
    is barely sure. Identity nodes after the activation (Paddle2ONNX writes one) are looked
    through and removed with it."""
    producers = {name: n for n in model.graph.node for name in n.output}
    node, passed = producers.get(output), []
    while node is not None and node.op_type == "Identity":
        passed.append(node)
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("Softmax", "Sigmoid"):
        return None
    if node.input[0] in {i.name for i in model.graph.input}:
        return None
    declared = next(o for o in model.graph.output if o.name == output).type.tensor_type
    dims = list(declared.shape.dim) if declared.HasField("shape") else None
    if node.op_type == "Softmax":
        axis = next((a.i for a in node.attribute if a.name == "axis"),
                    -1 if _opset(model) >= 13 else 1)  # fmt: skip
        if axis != 1 and not (axis == -1 and (dims is None or len(dims) == 2)):
            return None  # a Softmax over another axis than the classes'
    elif not dims or len(dims) < 2 or dims[1].dim_value != 1:
        return None  # a multi-label Sigmoid: its channels are not classes of one choice
    del model.graph.output[:]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None)
    )
    for removed in (node, *passed):
        model.graph.node.remove(removed)
    return node.op_type


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def _weight_precision(model: onnx.ModelProto) -> str:
    """The lowest float precision among the initializers (the verification tolerance)."""
    kinds = {init.data_type for init in model.graph.initializer}
    if onnx.TensorProto.BFLOAT16 in kinds:
        return "bfloat16"
    if onnx.TensorProto.FLOAT16 in kinds:
        return "float16"
    return "float32"


def _check_input_type(graph_input: onnx.ValueInfoProto, path: Path) -> None:
    elem = graph_input.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        name = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "unknown"
        raise ImportFailed(
            f"{path}: input '{graph_input.name}' is {name}; dafl-compress needs a float32 "
            "input (weights may be float16): export the model with float32 inputs"
        )


def _onnxruntime_runner(path: Path, input_name: str, output_names: list[str],
                        kind: str | None = None):  # fmt: skip
    """The file run by onnxruntime: ``output_names``' values (several joined the ``kind`` way,
    as ``_join_outputs`` joins them)."""
    try:
        session = onnx_session(path)
    except Exception as error:
        raise ImportFailed(f"{path}: onnxruntime cannot load it: {error}") from None

    def run(x: np.ndarray) -> np.ndarray:  # a fixed-batch file is fed chunks of its batch
        chunks = run_batched(session, {input_name: x.astype(np.float32)}, len(x), output_names)
        return np.concatenate([join_tensors([torch.from_numpy(out) for out in outputs],
                                            kind).numpy() for outputs in chunks])  # fmt: skip

    return run


def _free_fixed_batch(path: Path, model: onnx.ModelProto, graph_input: onnx.ValueInfoProto,
                      shape: tuple[int, ...], batch: int
                      ) -> tuple[onnx.ModelProto, int]:  # fmt: skip
    """A file that declares a fixed ``batch`` may still compute any batch (then it is compared
    in chunks of its batch). One whose graph fixes it (reshapes to [B, ...], as ultralytics'
    default export does to [1, ...]) is freed (``fixed_batch.free_batch``) when the freed graph
    gives, at another batch, what the file gives for the same samples; else it is refused here
    rather than failing deep in the conversion. Outputs without the batch (priors) must not
    change, where the batch is above 1 (at 1 nothing tells them from per-sample ones). Returns
    the model to import and the reshapes rewritten."""
    probe = 3 if batch == 2 else 2
    samples = -(-probe // batch) * batch  # whole runs of the file's batch
    x = np.random.default_rng(0).random((samples, *shape), dtype=np.float32)
    original = onnx_session(model.SerializeToString())
    name = graph_input.name
    chunks = [original.run(None, {name: x[i : i + batch]}) for i in range(0, len(x), batch)]
    batched = {k for k, out in enumerate(chunks[0]) if out.shape[:1] == (batch,)}
    expected = {k: np.concatenate([chunk[k] for chunk in chunks])[:probe] if k in batched else out
                for k, out in enumerate(chunks[0]) if k in batched or batch > 1}  # fmt: skip
    for freed, rewritten in (_declared_only(model, batch), free_batch(model, batch)):
        try:
            outputs = onnx_session(freed.SerializeToString()).run(None, {name: x[:probe]})
        except Exception:  # noqa: BLE001 - any failure at the probe batch means the same here
            continue
        if all(outputs[k].shape == want.shape
               and np.allclose(outputs[k], want, rtol=1e-4, atol=1e-5)
               for k, want in expected.items()):  # fmt: skip
            return freed, rewritten
    raise ImportFailed(
        f"{path}: the file fixes batch {batch} (input '{name}' is [{batch}, ...] and the graph "
        f"does not compute a batch of {probe}); export it with a dynamic batch dimension"
    )


def _declared_only(model: onnx.ModelProto, batch: int) -> tuple[onnx.ModelProto, int]:
    """``model`` with only its declared fixed ``batch`` made symbolic."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for value in (*probe.graph.input, *probe.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_value == batch:
            dims[0].dim_param = "batch"
    return probe, 0


@register_importer("onnx", _sniff)
def import_onnx(path: Path, *, input_shape=None, join_outputs: bool = False,
                **_unused) -> ImportedModel:  # fmt: skip
    """Convert with onnx2torch (plus our converters for newer opsets) after making the graph
    prunable (onnx_cleanup.py); check against the original file with onnxruntime. Of several
    outputs the main one is kept, or, ``join_outputs``, all of them joined (_join_outputs)."""
    model = _parse(path, load_external_data=True)
    graph_input = _graph_input(model, path)
    _check_input_type(graph_input, path)
    check_raw_outputs(model, path)
    shape, fixed_batch = _input_shape(model, graph_input, input_shape, path)
    check_model(model, path, shape)
    batch_freed = 0
    if fixed_batch:
        model, batch_freed = _free_fixed_batch(path, model, graph_input, shape, fixed_batch)
    prepared = clean_up(prepare_onnx_model(model))
    file_outputs = [out.name for out in prepared.graph.output]
    joined, activation, not_distilled, head_outputs = {}, None, [], []
    if join_outputs and len(file_outputs) > 1:
        output, joined = _join_outputs(prepared, path, shape)
    else:
        if len(file_outputs) > 1 and _one_detection_head(prepared, shape):
            head_outputs = file_outputs  # what --task detection would read as one head
        output, not_distilled = _pick_output(prepared, path)
        activation = _cut_final_activation(prepared, output)
        file_outputs = [output]
    module = onnx_to_torch(prepared, path, shape).eval()
    runner = _onnxruntime_runner(path, graph_input.name, file_outputs, join_kind_of(joined))
    precision = _weight_precision(model)
    distilled = {None: "logits", "Softmax": "logits before its Softmax",
                 "Sigmoid": "the logit before its Sigmoid, as two classes"}[activation]  # fmt: skip
    if activation == "Sigmoid":
        module = SigmoidAsTwoClasses(module).eval()
    as_file = FILE_OUTPUTS.get(distilled)
    checked = as_file(module) if as_file else module
    max_abs, max_rel = verify(checked, runner, shape, path, rtol=tolerance_for(precision))
    details = {
        "distilled_output": distilled,
        "opset": opset_version(model),
        "producer": model.producer_name,
        "verified_against": "onnxruntime",
        "output": output,
        "weights": precision,
    }
    if not_distilled:
        details["outputs_not_distilled"] = not_distilled
    details.update(joined)
    if head_outputs:  # said where another task refuses the file
        details["one_detection_head"] = head_outputs
    if batch_freed:
        details["batch_freed"] = (f"{batch_freed} reshape(s) of the batch-{fixed_batch} file "
                                  "rewritten")  # fmt: skip
    return ImportedModel(module, shape, max_abs, max_rel, details)
