"""INT8 post-training quantisation of any ONNX model with onnxruntime, calibrated on the inputs
the caller has: a tensor, an iterable of batches, or a function that makes ``n`` inputs (a
DAFL generator). Usable alone::

    from compress_toolbox.export.quantize import quantize_onnx
    from compress_toolbox.export.onnx_compare import compare_onnx
    result = quantize_onnx(Path("student.onnx"), Path("student.int8.onnx"), generate)
    agreement = compare_onnx(Path("student.onnx"), result.path, inputs)

The recipe is onnxruntime's own (its ``quantize_static`` docstring, "Choosing parameters for
CPU inference"): ``quant_pre_process`` (shape inference, fusion), then ``quantize_static`` in
QDQ format with per-channel, symmetric int8 weights; activations uint8 on x86-64 (with
``reduce_range`` where the CPU lacks VNNI) and int8 on ARM. Operators onnxruntime cannot
quantise stay float and are listed in the result (onnx_inspect.py); they never fail the
quantisation. The file is then compacted (onnx_compact.py: zero zero points dropped, short
internal names). The calibration inputs reach onnxruntime through onnx_feed.py.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from compress_toolbox.errors import DaflError, QuantizeError, first_line
from compress_toolbox.export.onnx_compact import compact
from compress_toolbox.export.onnx_feed import BatchReader, Calibration, calibration_feeds
from compress_toolbox.export.onnx_inspect import (
    fixed_batch,
    float_nodes,
    load_model,
    model_inputs,
    node_label,
    quantisable_op_types,
)
from compress_toolbox.export.onnx_names import unused

METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
MODES = ("int8",)
ACTIVATIONS = ("auto", "uint8", "int8")

# Default calibration, chosen by benchmarks/bench_int8.py (3 digits CNNs, one seed, a 2-core
# EPYC with VNNI loaded by another job). Calibrated on real-looking inputs, the three methods
# gave the same accuracy and logits (mean |logit difference| within 0.002). They differ when the
# inputs are off the data, the data-free case. On uniform noise in [0, 1] the real digits'
# activations overflow the calibrated ranges, and Percentile, which narrows ranges further, did
# worse than MinMax (LeNet-5 at 1024 samples: mean |logit difference| 1.79 vs 1.61, argmax
# agreement 96.7% vs 98.0%); on N(0, 1) noise (wide ranges) it did slightly better (0.076 vs
# 0.082, same accuracy). Entropy gave exactly MinMax's numbers at 2-5x the calibration time:
# through quantize_static its histogram has 128 bins for 128 quantised bins, so its search has
# one candidate threshold, the full range. Hence MinMax: never worse where it mattered, and the
# cheapest (0.06-0.5 s for 1024 samples there).
DEFAULT_METHOD = "MinMax"
# MinMax ranges only widen with more samples, which off-data calibration needs: 1024 uniform-
# noise samples instead of 256 cut the mean |logit difference| by 11-21% on all three models
# (real-looking inputs: no difference), for a fraction of a second.
DEFAULT_SAMPLES = 1024
DEFAULT_BATCH = 32
# Symmetric int8 weights (onnxruntime's default for signed weights, said explicitly). Not
# CalibMaxIntermediateOutputs, which would bound MinMax's memory: in onnxruntime 1.32 it clears
# the collected activations without merging their ranges first, so the ranges come from the
# last few batches only (or "No data is collected" when the batches divide evenly). Every
# method therefore holds all calibration activations in memory: samples x activation size.
#
# Biases stay float32 (QuantizeBias off): an int32 bias needs its own per-channel scale tensor
# and DequantizeLinear node in the file (+14% of a LeNet-5-half's INT8 file), while
# onnxruntime's CPU EP quantises float biases itself when it fuses the QDQ groups: the same
# QLinearConv/QGemm graph, the same latency and outputs (measured), and TensorRT prefers them.
_CALIB_OPTIONS = {"WeightSymmetric": True, "QuantizeBias": False}

# Convolutions with fewer output channels stay float: there onnxruntime's CPU QLinearConv was
# slower than its float Conv on the CPU measured (benchmarks/bench_int8_size.py, 2-core x86-64
# without VNNI, batch 32, one thread: a LeNet-5-half's 1->3 conv 607 us INT8 against 158 us
# float, a ResNet-8-half's 8-channel convs 551-696 us against 97-623 us; from 16 channels on
# INT8 was faster). Keeping them float took the suite's students' INT8 batch-32 latency from
# 2.96-3.18x of float to 1.05-1.06x (LeNet-5s) and 1.02-1.11x to 0.85-0.90x (ResNet-8s). Their
# weights are still stored int8 (``int8_weights``), so the file is about as small as with them
# quantised. Other targets may differ: ``min_conv_channels=0`` quantises them all.
MIN_INT8_CONV_CHANNELS = 16


@dataclass(frozen=True)
class QuantizeResult:
    """What ``quantize_onnx`` wrote and how."""

    path: Path
    method: str  # calibration method: MinMax, Entropy or Percentile
    samples: int  # calibration samples actually fed
    activations: str  # uint8 or int8
    reduce_range: bool  # 7-bit weights (x86-64 without VNNI)
    float_ops: tuple[tuple[str, str], ...]  # (node name, op type) onnxruntime left in float
    size_bytes: int
    float_size_bytes: int
    seconds: float  # pre-processing + calibration + quantisation
    notes: tuple[str, ...] = ()  # e.g. pre-processing skipped and why
    # (node name, op type) kept float by choice: narrow convolutions and the ops they feed
    kept_float: tuple[tuple[str, str], ...] = ()
    int8_weight_convs: int = 0  # of those convolutions, how many store their weights int8

    @property
    def size_ratio(self) -> float:
        """INT8 file size over the float file size."""
        return self.size_bytes / max(self.float_size_bytes, 1)

    @property
    def float_op_types(self) -> tuple[str, ...]:
        """The sorted op types of the nodes onnxruntime left float (e.g. ``("Erf", "Sin")``);
        those kept float by choice are in ``kept_float``."""
        return tuple(sorted({op for _, op in self.float_ops}))


def cpu_recommended_activations() -> tuple[str, bool]:
    """(activation type, reduce_range) onnxruntime recommends for the CPU running this code:
    uint8 on x86-64 (reduce_range without VNNI, to avoid int16 saturation in VPMADDUBSW),
    int8 on ARM. Quantise for a different target by passing ``activations`` explicitly."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") or machine.startswith("arm"):
        return "int8", False
    return "uint8", not _has_vnni()


def _has_vnni() -> bool:
    # Only Linux says so cheaply; elsewhere assume no VNNI (reduce_range costs 1 bit of weight
    # precision, saturation costs far more).
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_onnx(
    model: Path,
    out: Path,
    calibration: Calibration,
    *,
    method: str = DEFAULT_METHOD,
    samples: int = DEFAULT_SAMPLES,
    batch: int = DEFAULT_BATCH,
    mode: str = "int8",
    activations: str = "auto",
    percentile: float = 99.999,
    nodes_to_exclude: Sequence[str] = (),
    min_conv_channels: int = MIN_INT8_CONV_CHANNELS,
) -> QuantizeResult:
    """Quantise the float ONNX ``model`` to INT8 at ``out`` (QDQ, static, per-channel weights).

    ``calibration`` is an array of inputs (first axis = samples), an iterable of batches, or a
    function ``n -> n inputs`` (a generator); at most ``samples`` inputs are fed, in whole
    batches of ``batch`` (or the model's fixed batch size): ``result.samples`` says how many.
    ``method`` is MinMax, Entropy or Percentile (at ``percentile``). ``activations`` "auto"
    follows onnxruntime's advice for this CPU. Convolutions with fewer than
    ``min_conv_channels`` output channels stay float (faster so; 0 quantises them all) and are
    listed in ``kept_float``; nodes onnxruntime cannot quantise stay float and are listed in
    ``float_ops``. ``out`` appears only once complete. Raises ``QuantizeError``
    (one line naming the file) for bad options, unreadable models or a failing quantiser.
    """
    model, out = Path(model), Path(out)
    canonical, act_type, reduce_range = _check_options(model, out, method, samples, batch, mode,
                                                       activations, percentile)  # fmt: skip
    float_model = load_model(model)
    inputs = model_inputs(model, float_model)
    start = time.perf_counter()
    try:  # everything is written in a hidden folder next to ``out``, moved in at the end
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as work:
            prepared, notes = _preprocess(model, Path(work) / "prepared.onnx")
            prepared, narrow = _narrow_named(prepared, Path(work) / "named.onnx",
                                             min_conv_channels)  # fmt: skip
            batch = fixed_batch(float_model) or batch
            feeds = calibration_feeds(calibration, inputs, samples, batch, model)
            reader = BatchReader(feeds, model)
            staged = Path(work) / out.name
            _quantize_static(model, prepared, staged, reader, canonical, act_type, reduce_range,
                             {**_CALIB_OPTIONS, "CalibPercentile": percentile},
                             [*nodes_to_exclude, *narrow], notes)  # fmt: skip
            quantised = load_model(staged)
            float_ops, kept_float = _split_kept(quantised, float_nodes(quantised), narrow)
            converted = _shrink_file(staged, quantised, narrow,
                                     keep_nodes=[name for name, _ in float_ops + kept_float])
            _move_into_place(staged, out)
    except OSError as error:
        raise QuantizeError(f"{out}: cannot write the INT8 model ({error.strerror or error})"
                            ) from error  # fmt: skip
    return QuantizeResult(out, canonical, reader.samples, act_type, reduce_range, float_ops,
                          out.stat().st_size, model.stat().st_size, time.perf_counter() - start,
                          tuple(notes), kept_float, converted)  # fmt: skip


def narrow_convolutions(model: onnx.ModelProto, min_channels: int) -> list[onnx.NodeProto]:
    """The Conv nodes of ``model`` whose weight (an initializer) has fewer than
    ``min_channels`` output channels."""
    weights = {tensor.name: tensor.dims for tensor in model.graph.initializer}
    return [node for node in model.graph.node
            if node.op_type == "Conv" and len(node.input) > 1
            and weights.get(node.input[1], [min_channels])[0] < min_channels]  # fmt: skip


def int8_weights(model: onnx.ModelProto, conv_names: Collection[str]) -> int:
    """Store the float weights of the Conv nodes named ``conv_names`` as per-output-channel
    symmetric int8 times a float scale (in place): the file shrinks about as if they were
    quantised while they still compute in float (weight-only quantisation). Returns how many
    weights it converted; a weight shared by other nodes, also a graph input, or not a float
    initializer stays.

    Cast and Mul, not DequantizeLinear: onnxruntime's CPU EP constant-folds the former at load,
    so the Conv keeps a constant weight and its pre-packed float kernel, while it never folds a
    DequantizeLinear (kept for QDQ fusion); a Conv whose weight came through one ran 1.2-1.3x
    slower at batch 32 (LeNet-5-half and ResNet-8-half students, benchmarks/bench_int8_size.py).
    """
    graph = model.graph
    readers = Counter(name for node in graph.node for name in node.input)
    readers.update(value.name for value in graph.input)
    initializers = {init.name: init for init in graph.initializer}
    taken = {*readers, *initializers, *(name for node in graph.node for name in node.output)}
    converted = 0
    for index in range(len(graph.node) - 1, -1, -1):  # backwards: insertions keep indices valid
        node = graph.node[index]
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if (node.op_type != "Conv" or node_label(node) not in conv_names or weight is None
                or weight.data_type != onnx.TensorProto.FLOAT or readers[weight.name] != 1):
            continue
        int8_name, scale_name, float_name = (unused(f"{weight.name}_{suffix}", taken)
                                             for suffix in ("int8", "scale", "float"))  # fmt: skip
        int8_values, scale = _per_channel_int8(numpy_helper.to_array(weight))
        graph.initializer.remove(weight)
        graph.initializer.extend([numpy_helper.from_array(int8_values, int8_name),
                                  numpy_helper.from_array(scale, scale_name)])  # fmt: skip
        graph.node.insert(index, helper.make_node("Mul", [float_name, scale_name], [weight.name]))
        graph.node.insert(index, helper.make_node("Cast", [int8_name], [float_name],
                                                  to=onnx.TensorProto.FLOAT))  # fmt: skip
        converted += 1
    return converted


def _per_channel_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale broadcastable over them): symmetric, one scale per output
    channel (the first axis), the largest magnitude at 127."""
    scale = np.abs(values.reshape(len(values), -1)).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    scale = scale.reshape(-1, *[1] * (values.ndim - 1))
    return np.clip(np.rint(values / scale), -127, 127).astype(np.int8), scale


def _narrow_named(prepared: Path, named: Path, min_channels: int) -> tuple[Path, list[str]]:
    """(the model to quantise, the names of its narrow convolutions): ``quantize_static``
    excludes nodes by name, so unnamed narrow convolutions are named first, in a copy at
    ``named`` (never in the user's file, which ``prepared`` is when pre-processing failed)."""
    model = load_model(prepared)
    narrow = narrow_convolutions(model, min_channels)
    unnamed = [node for node in narrow if not node.name]
    if unnamed and prepared.stat().st_size <= COMPACT_LIMIT_BYTES:
        taken = {node.name for node in model.graph.node}
        for index, node in enumerate(unnamed):
            node.name = unused(f"narrow_conv_{index}", taken)
        onnx.save(model, str(named))
        prepared = named
    return prepared, [node.name for node in narrow if node.name]


def _split_kept(quantised: onnx.ModelProto, float_ops: tuple[tuple[str, str], ...],
                chosen: Sequence[str]) -> tuple[tuple, tuple]:  # fmt: skip
    """(the ``float_ops`` onnxruntime left float, the nodes kept float by choice): the
    ``chosen`` nodes (float even where their input comes through a DequantizeLinear) and the
    quantisable ops that read what those compute (a Relu or a MaxPool after a float
    convolution). ``float_ops`` come in graph order."""
    named = [(node_label(node), node) for node in quantised.graph.node]
    producer = {out: name for name, node in named for out in node.output}
    inputs = {name: node.input for name, node in named}
    kept, quantisable = set(chosen), quantisable_op_types()
    for name, op in float_ops:
        if op in quantisable and any(producer.get(i) in kept for i in inputs.get(name, ())):
            kept.add(name)
    kept_nodes = tuple((name, node.op_type) for name, node in named if name in kept)
    return tuple(node for node in float_ops if node[0] not in kept), kept_nodes


COMPACT_LIMIT_BYTES = 1 << 30  # larger files keep onnxruntime's names (one protobuf: < 2 GiB)


def _shrink_file(path: Path, model: onnx.ModelProto, float_convs: Sequence[str],
                 keep_nodes: Sequence[str]) -> int:  # fmt: skip
    """The QDQ file at ``path`` (holding ``model``, changed in place) rewritten smaller where it
    can be saved again as one protobuf: the ``float_convs``' weights stored int8
    (``int8_weights``) and the graph compacted (onnx_compact.py, same computation). Returns
    how many weights it stored int8."""
    if path.stat().st_size > COMPACT_LIMIT_BYTES:
        return 0
    converted = int8_weights(model, float_convs)
    if compact(model, keep_nodes) or converted:
        onnx.save(model, str(path))
    return converted


def _quantize_static(model: Path, prepared: Path, staged: Path, reader: BatchReader,
                     method: str, act_type: str, reduce_range: bool, options: dict,
                     nodes_to_exclude: Sequence[str], notes: list[str]) -> None:  # fmt: skip
    """onnxruntime's ``quantize_static`` (QDQ, per-channel symmetric int8 weights), its failures
    as one line naming ``model``."""
    try:
        with _onnxruntime_quiet(notes):
            quantize_static(
                str(prepared), str(staged), reader, quant_format=QuantFormat.QDQ,
                per_channel=True, reduce_range=reduce_range,
                activation_type=QuantType.QUInt8 if act_type == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
                nodes_to_exclude=list(nodes_to_exclude) or None, extra_options=options,
            )  # fmt: skip
    except DaflError:
        raise
    except Exception as error:
        if reader.samples == 0 and reader.exhausted:
            raise QuantizeError(f"{model}: the calibration data gave no inputs") from error
        why = f"{type(error).__name__}: {first_line(error)}"
        raise QuantizeError(f"{model}: onnxruntime could not quantise it ({why})") from error


def _check_options(model: Path, out: Path, method: str, samples: int, batch: int, mode: str,
                   activations: str, percentile: float) -> tuple[str, str, bool]:  # fmt: skip
    """Refuse bad options before any work, one line each; (method, activations, reduce_range)."""
    if str(mode).lower() not in MODES:
        raise QuantizeError(f"{model}: quantisation mode {mode!r} is not supported "
                            f"(supported: {', '.join(MODES)})")  # fmt: skip
    canonical = METHODS.get(str(method).lower())
    if canonical is None:
        raise QuantizeError(f"{model}: unknown calibration method {method!r} "
                            f"(choose {', '.join(METHODS.values())})")  # fmt: skip
    if activations not in ACTIVATIONS:
        raise QuantizeError(f"{model}: activations must be one of {', '.join(ACTIVATIONS)}, "
                            f"not {activations!r}")  # fmt: skip
    if not (isinstance(samples, int) and samples >= 1 and isinstance(batch, int) and batch >= 1):
        raise QuantizeError(f"{model}: samples and batch must be positive integers "
                            f"(got {samples!r}, {batch!r})")  # fmt: skip
    if not 0 < percentile <= 100:
        raise QuantizeError(f"{model}: percentile must be in (0, 100], not {percentile!r}")
    if not model.is_file():
        raise QuantizeError(f"{model}: no such file")
    if out.resolve() == model.resolve():
        raise QuantizeError(f"{model}: the INT8 output must not overwrite the float model")
    if activations == "auto":
        act_type, reduce_range = cpu_recommended_activations()
    else:
        act_type, reduce_range = activations, False
    return canonical, act_type, reduce_range


def _preprocess(model: Path, prepared: Path) -> tuple[Path, list[str]]:
    """onnxruntime's pre-processing (symbolic shape inference, fusions, ONNX shape inference).
    Symbolic shape inference fails on ops it does not know (custom ops): retry without it, and
    quantise the model as is if that fails too; the notes say what happened. Changes the
    process's current folder meanwhile (not thread-safe)."""
    notes: list[str] = []
    model, prepared = model.resolve(), prepared.resolve()
    for skip_symbolic in (False, True):
        try:  # it logs (not raises) a failed optimisation; a failed symbolic shape inference
            # saves its partial model in the current folder: make that our scratch folder
            with _onnxruntime_quiet(notes), contextlib.chdir(prepared.parent):
                quant_pre_process(str(model), str(prepared), skip_symbolic_shape=skip_symbolic)
            return prepared, notes
        except Exception as error:  # any failure here only costs the pre-processing
            step = "symbolic shape inference" if not skip_symbolic else "pre-processing"
            notes.append(f"{step} failed ({type(error).__name__}: {first_line(error)})")
    notes.append("quantised without pre-processing")
    return model, notes


class _NoteHandler(logging.Handler):
    """Keeps the gist (one line) of onnxruntime.quantization's warnings and errors."""

    def __init__(self, notes: list[str]):
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        lines = [line.strip() for line in record.getMessage().splitlines() if line.strip()]
        if lines:  # a logged traceback: its last line says what went wrong
            line = (lines[-1] if lines[0].startswith("Traceback") else lines[0])[:200]
            if line not in self.notes:
                self.notes.append(line)


@contextlib.contextmanager
def _onnxruntime_quiet(notes: list[str]) -> Iterator[None]:
    """onnxruntime.quantization's log records become ``notes`` and its prints (calibrator
    progress) vanish, instead of lines on the caller's terminal."""
    logger = logging.getLogger("onnxruntime.quantization")
    handler, propagate = _NoteHandler(notes), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _move_into_place(staged: Path, out: Path) -> None:
    """Rename the finished file over ``out`` (same folder: atomic); copy if rename fails."""
    try:
        os.replace(staged, out)
    except OSError:
        partial = out.with_name(f".{out.name}.partial")
        shutil.copyfile(staged, partial)
        os.replace(partial, out)


