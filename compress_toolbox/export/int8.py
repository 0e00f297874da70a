"""INT8 copies of exported models, verified and judged before they are shipped (issue 27).

``quantize_model`` quantises any float ONNX model from a generator or a tensor of inputs
(``quantize.quantize_onnx``: onnxruntime's static QDQ quantisation, per-channel int8 weights,
MinMax calibration), runs the result in onnxruntime at the export batches, measures its
agreement with the float model on generated inputs and its score on labelled data, and keeps it
under its name only when it loses no more than the margin; otherwise it is renamed
``*.rejected.onnx``, never presented as equivalent. ``quantize_outputs`` is the pipeline's step
after student.onnx is verified: the student (and, asked, the teacher) quantised from the trained
generator's inputs, and report.json's ``int8`` entry with the four-row comparison table.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch

from compress_toolbox.distillation.methods import get_method
from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError, VerificationFailed, first_line
from compress_toolbox.export.calibration import (
    CalibrationSource,
    from_array,
    from_file,
    from_sampler,
)
from compress_toolbox.export.layout import (
    channels_first_copy,
    is_channels_last,
    take_channels_last_input,
)
from compress_toolbox.export.onnx_compare import Agreement, compare_onnx, latency_ms
from compress_toolbox.export.onnx_inspect import fixed_batch
from compress_toolbox.export.quantize import (
    DEFAULT_SAMPLES,
    MIN_INT8_CONV_CHANNELS,
    QuantizeResult,
    quantize_onnx,
)
from compress_toolbox.export.verification import EXPORT_BATCHES, random_inputs
from compress_toolbox.export.writer import onnx_session, session_batch, teacher_onnx
from compress_toolbox.tasks import Task, get_task, task_of_output
from compress_toolbox.tasks.evaldata import EvalData

if TYPE_CHECKING:
    from compress_toolbox.config import CompressConfig
    from compress_toolbox.distillation.options import DistillResult
    from compress_toolbox.load.teacher import Teacher

SCORE_MARGIN = 0.02  # an INT8 model losing more accuracy (or mean IoU) than this is rejected
MIN_AGREEMENT = 0.95  # without eval data: top-1 agreement with the float model at least this
CHECK_SAMPLES = 512  # fresh generated inputs the agreement is measured on
# Ops that only move or reshape data: left in float (e.g. a Flatten on the float input) they
# compute nothing, so the report lists them apart from the ops onnxruntime cannot quantise.
LAYOUT_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                        "Shape", "Cast", "Slice", "Gather", "Expand", "Split", "Concat"})
LATENCY_BATCHES = (1, 32)
LATENCY_RUNS = 20


@dataclass(frozen=True)
class Int8Result:
    """What ``quantize_model`` made of one float model: where the INT8 model is (renamed
    ``*.rejected.onnx`` when rejected), how it was quantised, how close it stays."""

    status: str  # "ok" or "rejected"
    path: Path
    quantized: QuantizeResult
    agreement: Agreement  # against the float model on the check inputs
    agreement_on: str
    float_score: float | None = None  # accuracy or mean IoU on labelled data, when given
    score: float | None = None
    figure: str | None = None  # "accuracy" or "mean IoU"
    reason: str = ""  # why it was rejected
    verified_batches: tuple[int, ...] = EXPORT_BATCHES


Calibration = CalibrationSource | np.ndarray | torch.Tensor | Callable[[int], Any]


def as_source(calibration: Calibration) -> CalibrationSource:
    """A CalibrationSource from a source, an array or tensor of inputs, or a function ``n -> n
    inputs`` (a generator's sampler)."""
    if isinstance(calibration, CalibrationSource):
        return calibration
    if isinstance(calibration, (np.ndarray, torch.Tensor)):
        return from_array(calibration)
    if callable(calibration):
        def draw(n: int) -> np.ndarray:
            x = calibration(n)
            return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x
        return CalibrationSource(draw, "inputs of the given generator")
    kind = type(calibration).__name__
    raise DaflError(f"calibration: expected inputs or a generator, not a {kind}")


def rejected_path(out: Path) -> Path:
    """``student.int8.onnx`` -> ``student.int8.rejected.onnx``."""
    return out.with_name(f"{out.stem}.rejected{out.suffix}")


def quantize_model(model: Path, out: Path, calibration: Calibration, *,
                   samples: int = DEFAULT_SAMPLES, check_inputs: np.ndarray | None = None,
                   eval_data: EvalData | None = None, input_shape: tuple[int, ...] | None = None,
                   score_margin: float | None = None, min_agreement: float | None = None,
                   task: Task | None = None) -> Int8Result:  # fmt: skip
    """Quantise the float ONNX ``model`` to INT8 at ``out``, calibrated on ``samples`` inputs
    from ``calibration`` (inputs, or a generator ``n -> inputs``); verify it in onnxruntime at
    the export batches; compare it with ``model`` on ``check_inputs`` (default: further draws
    from ``calibration``) and on ``eval_data``. One that loses more than ``score_margin``
    (default SCORE_MARGIN) of accuracy / mean IoU on ``eval_data``, or without eval data agrees
    on less than ``min_agreement`` (default MIN_AGREEMENT), is renamed ``*.rejected.onnx`` and
    returned with status "rejected". ``task`` (default: read from the eval data) says how
    outputs are scored and compared (detection: mAP@0.5, fidelity instead of top-1). Raises
    DaflError (one line) when it cannot be quantised or does not run; nothing is then left at
    ``out``."""
    model, out = Path(model), Path(out)
    source = as_source(calibration)
    quantized = quantize_onnx(model, out, source.draw, samples=samples)
    try:
        batches = verify_int8(model, out, input_shape)
        check = check_inputs if check_inputs is not None else source.draw(CHECK_SAMPLES)
        agreement = _agreement(model, out, check, task)
        scores = _scores(model, out, eval_data, task)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    reason = _verdict(agreement, *scores,
                      SCORE_MARGIN if score_margin is None else score_margin,
                      MIN_AGREEMENT if min_agreement is None else min_agreement)  # fmt: skip
    path = rejected_path(out) if reason else out
    os.replace(out, path)
    if not reason:  # an earlier verdict on the same name must not linger beside this one
        rejected_path(out).unlink(missing_ok=True)
    return Int8Result("rejected" if reason else "ok", path, quantized, agreement,
                      f"{len(check)} draws of {source.what}", *scores, reason,
                      batches)  # fmt: skip


def _agreement(model: Path, int8: Path, check: np.ndarray, task: Task | None) -> Agreement:
    """``compare_onnx``, with the task's own agreement figure where it has one."""
    agreement = compare_onnx(model, int8, check)
    own = task.onnx_agreement(model, int8, check) if task is not None else None
    if own is None:
        return agreement
    measure, value = own
    return replace(agreement, top1=None, task_figure=value, task_measure=measure)


def _judge(data: EvalData, task: Task | None) -> Task:
    """The task that scores ``data``: ``task``, else what the labels say (masks or classes)."""
    return task or get_task("segmentation" if data.y.dim() > 1 else "classification")


def _scores(model: Path, int8: Path, data: EvalData | None, task: Task | None
            ) -> tuple[float | None, float | None, str | None]:  # fmt: skip
    """(float score, INT8 score, figure) on the eval data; Nones without it."""
    if data is None:
        return None, None, None
    judge = _judge(data, task)
    return judge.onnx_score(model, data), judge.onnx_score(int8, data), judge.figure


def _score_or_none(model: Path, data: EvalData | None, task: Task | None) -> float | None:
    if data is None:
        return None
    try:
        return _judge(data, task).onnx_score(model, data)
    except Exception:  # a measurement never fails the run (reported as n/a)
        return None


def _verdict(agreement: Agreement, float_score: float | None, int8_score: float | None,
             figure: str | None, margin: float, min_agreement: float) -> str:  # fmt: skip
    """Why the INT8 model is not equivalent to the float one, or "" when it is."""
    if float_score is not None and int8_score is not None:
        loss = float_score - int8_score
        if loss > margin:
            return (f"it loses {100 * loss:.2f} points of {figure} against the float model "
                    f"({100 * int8_score:.2f}% vs {100 * float_score:.2f}%; margin "
                    f"{100 * margin:g} points)")  # fmt: skip
        return ""
    if agreement.value is not None and agreement.value < min_agreement:
        what = agreement.task_measure or "agreement"
        return (f"its {what} with the float model on the check inputs is "
                f"{100 * agreement.value:.1f}% (at least {100 * min_agreement:g}% needed)")
    return ""


def _input_shape(model: Path, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(input_shape)
    dims = onnx_session(model).get_inputs()[0].shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise DaflError(f"{model}: its input shape {dims} is not fixed; give the input shape")
    return tuple(dims)


def verify_int8(model: Path, int8: Path, input_shape: tuple[int, ...] | None = None
                ) -> tuple[int, ...]:  # fmt: skip
    """Run the INT8 model in onnxruntime at the export batches (or the float model's fixed
    batch) beside the float model: same output shapes, finite values. The batches checked."""
    shape = _input_shape(model, input_shape)
    reference, candidate = onnx_session(model), onnx_session(int8)
    fixed = session_batch(reference)
    batches = (fixed,) if fixed else EXPORT_BATCHES
    for batch in batches:
        x = random_inputs(shape, batch).numpy()
        expected = reference.run(None, {reference.get_inputs()[0].name: x})[0]
        try:
            got = candidate.run(None, {candidate.get_inputs()[0].name: x})[0]
        except Exception as error:
            raise VerificationFailed(f"{int8}: the INT8 model fails at batch {batch} "
                                     f"({type(error).__name__})") from error  # fmt: skip
        if got.shape != expected.shape or not np.isfinite(got).all():
            raise VerificationFailed(f"{int8}: the INT8 model gives shape {got.shape} (float: "
                                     f"{expected.shape}) or non-finite values at batch {batch}")
    return batches


@dataclass(frozen=True)
class ModelRow:
    """One row of the report's INT8 table: a model file as shipped, measured in onnxruntime."""

    model: str  # "teacher fp32", "student int8", ...
    file: str | None
    status: str  # "ok", "rejected", "failed"
    params: int | None
    onnx_bytes: int | None
    latency_ms: dict[str, float | None]  # "batch 1", "batch 32" (or a fixed batch): medians
    score: float | None  # accuracy or mean IoU on the eval data
    agreement: float | None = None  # int8 rows: agreement with the float model (Agreement.value)


def measure_latency(model: Path, input_shape: tuple[int, ...]) -> dict[str, float | None]:
    """Median onnxruntime CPU latency (one thread) by "batch B": at each of LATENCY_BATCHES,
    or at the one batch a file fixes; None where a measurement fails."""
    fixed = fixed_batch(onnx.load(str(model), load_external_data=False))
    found: dict[str, float | None] = {}
    for batch in (fixed,) if fixed else LATENCY_BATCHES:
        try:
            found[f"batch {batch}"] = round(latency_ms(model, random_inputs(input_shape, batch)
                                                       .numpy(), runs=LATENCY_RUNS), 4)
        except Exception:  # a measurement never fails the run
            found[f"batch {batch}"] = None
    return found


def float_row(name: str, path: Path, params: int | None, input_shape: tuple[int, ...],
              data: EvalData | None, task: Task | None = None) -> ModelRow:  # fmt: skip
    """The row of a float model (its score recomputed in onnxruntime)."""
    size = path.stat().st_size + _external_bytes(path)
    return ModelRow(name, path.name, "ok", params, size, measure_latency(path, input_shape),
                    _score_or_none(path, data, task))  # fmt: skip


def int8_row(name: str, result: Int8Result | str, params: int | None,
             input_shape: tuple[int, ...]) -> ModelRow:  # fmt: skip
    """The row of an INT8 model; ``result`` a failure's reason when there is none."""
    if isinstance(result, str):
        return ModelRow(name, None, "failed", params, None, {}, None)
    return ModelRow(name, result.path.name, result.status, params, result.quantized.size_bytes,
                    measure_latency(result.path, input_shape), result.score,
                    result.agreement.value)  # fmt: skip


def _external_bytes(path: Path) -> int:
    extra = path.with_name(path.name + ".data")
    return extra.stat().st_size if extra.exists() else 0


def describe(result: Int8Result | str) -> dict[str, Any]:
    """report.json's account of one quantised model (or of its failure, a one-line reason)."""
    if isinstance(result, str):
        return {"status": "failed", "reason": result, "file": None}
    q = result.quantized
    return {
        "status": result.status,
        "reason": result.reason or None,
        "file": result.path.name,
        "calibration_method": q.method,
        "calibration_samples": q.samples,
        "activations": q.activations,
        "reduce_range": q.reduce_range,
        "float_op_types": sorted({op for _, op in q.float_ops} - LAYOUT_OPS),
        "float_layout_ops": sorted({op for _, op in q.float_ops} & LAYOUT_OPS),
        "float_ops": [list(node) for node in q.float_ops],
        "kept_float_ops": [list(node) for node in q.kept_float],
        "kept_float_reason": kept_float_reason(q),
        "size_ratio": round(q.size_ratio, 4),
        "quantize_s": round(q.seconds, 3),
        "agreement": {**asdict(result.agreement), "on": result.agreement_on},
        "figure": result.figure,
        "float_score": result.float_score,
        "score": result.score,
        "verified_batches": list(result.verified_batches),
        "notes": list(q.notes),
    }


def kept_float_reason(q: QuantizeResult) -> str | None:
    """Why ``q`` keeps some computing nodes float by choice (None: it keeps none)."""
    convs = sum(op == "Conv" for _, op in q.kept_float)
    if not convs:
        return None
    stored = " (their weights stored int8)" if q.int8_weight_convs == convs else ""
    return (f"{convs} convolution(s) with fewer than {MIN_INT8_CONV_CHANNELS} output channels "
            f"kept float{stored}, with the ops they feed, because onnxruntime's INT8 kernel was "
            f"slower there on the CPU measured")


def quantize_outputs(work: Path, student_onnx: Path, student_params: int, teacher: Teacher,
                     source: CalibrationSource, data: EvalData | None, *, samples: int,
                     with_teacher: bool, task: Task | None = None) -> dict[str, Any]:  # fmt: skip
    """The pipeline's INT8 step: ``student.int8.onnx`` (or ``.rejected.onnx``) in ``work``,
    and, ``with_teacher``, ``teacher.int8.onnx``, each from ``samples`` inputs of ``source``;
    a model onnxruntime cannot quantise is reported "failed", never failing the run. Returns
    report.json's ``int8`` entry: the four-row table, each model's account, the margin."""
    shape, check = teacher.input_shape, source.draw(CHECK_SAMPLES)
    scratch = work / ".int8"
    scratch.mkdir()
    try:
        t_float = teacher_onnx(teacher, scratch)
        rows = [_teacher_row(teacher, t_float, data, task)] if t_float else []
        entry: dict[str, Any] = {"teacher": None}
        if with_teacher and t_float:
            t_int8 = _attempt(t_float, work / "teacher.int8.onnx", source, samples, check, data,
                              shape, task)  # fmt: skip
            rows.append(int8_row("teacher int8", t_int8, teacher.analysis.params, shape))
            entry["teacher"] = describe(t_int8)
        s_int8 = _attempt(student_onnx, work / "student.int8.onnx", source, samples, check, data,
                          shape, task)  # fmt: skip
        rows += [float_row("student fp32", student_onnx, student_params, shape, data, task),
                 int8_row("student int8", s_int8, student_params, shape)]  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"mode": "int8", "calibrated_on": source.what, "student": describe(s_int8), **entry,
            "margin": _margin_text(s_int8, data, task),
            "rows": [asdict(row) for row in rows]}  # fmt: skip


def _teacher_row(teacher: Teacher, path: Path, data: EvalData | None,
                 task: Task | None) -> ModelRow:  # fmt: skip
    """The teacher fp32 row; a teacher given in another format is measured as exported."""
    row = float_row("teacher fp32", path, teacher.analysis.params, teacher.input_shape, data,
                    task)  # fmt: skip
    if teacher.format == "onnx":
        return row
    return replace(row, file=f"{Path(teacher.source).name} (as ONNX)")


def _attempt(model: Path, out: Path, source: CalibrationSource, samples: int, check: np.ndarray,
             data: EvalData | None, shape: tuple[int, ...],
             task: Task | None) -> Int8Result | str:  # fmt: skip
    """``quantize_model``, or the one-line reason it failed (nothing left at ``out``): an INT8
    copy that cannot be made is reported, never fails the run."""
    try:
        return quantize_model(model, out, source, samples=samples, check_inputs=check,
                              eval_data=data, input_shape=shape, task=task)  # fmt: skip
    except DaflError as error:
        return str(error)
    except Exception as error:  # onnxruntime's own errors while comparing or scoring
        return f"{out.name}: {type(error).__name__}: {first_line(error)}"


def _margin_text(result: Int8Result | str, data: EvalData | None, task: Task | None) -> str:
    """What the student's INT8 copy was judged by: its score on the eval data where it has
    one, else its agreement with the float model."""
    scored = result.float_score is not None if isinstance(result, Int8Result) else data
    if scored:
        figure = _judge(data, task).figure
        return f"at most {100 * SCORE_MARGIN:g} points of {figure} lost on the eval data"
    measure = isinstance(result, Int8Result) and result.agreement.task_measure
    return (f"{measure or 'top-1 agreement'} with the float model at least "
            f"{100 * MIN_AGREEMENT:g}% on {CHECK_SAMPLES} fresh generated inputs")  # fmt: skip


def quantize_step(work: Path, student_onnx: Path, inputs: Any, result: DistillResult,
                  config: CompressConfig) -> dict[str, Any]:  # fmt: skip
    """``quantize_outputs`` for a finished run, as ``config.quantize`` says: ``inputs`` the
    pipeline's (teacher, eval data, student plan), calibrated on fresh inputs of ``result``'s
    trained generator (class-balanced when the generator is class-conditional)."""
    teacher = inputs.teacher
    conditional = getattr(get_method(result.method), "conditional", False)
    source = from_sampler(result.sampler, teacher.input_shape,
                          bool(conditional and config.task.one_class_per_input))  # fmt: skip
    return quantize_outputs(work, student_onnx, inputs.plan.analysis.params, teacher, source,
                            inputs.data, samples=config.quantize.samples,
                            with_teacher=config.quantize.teacher, task=config.task)  # fmt: skip


def quantize_file(model: Path, calibration: Path, *, out: Path | None = None,
                  samples: int = DEFAULT_SAMPLES, eval_data: Path | None = None,
                  task: str | None = None, mean: Any = None, std: Any = None,
                  force: bool = False, head: str | None = None,
                  ) -> tuple[Int8Result, list[ModelRow]]:  # fmt: skip
    """``dafl-compress quantize``: an existing float ONNX model (``student.onnx`` of an output
    folder) quantised from the inputs in ``calibration`` (.npy, or .npz with ``x``; fed as the
    model takes them) to ``out`` (default ``MODEL.int8.onnx`` beside it), judged on the eval
    data when given (read as ``--eval-data`` is, with ``mean``/``std``). Returns the result and
    the float/INT8 rows. Refuses to replace an existing INT8 file without ``force``. ``head``
    names a detection head's layout (``--head``) where the file does not tell it. A student
    made channels last (a TensorFlow teacher's, ``layout.py``) is quantised channels first,
    as it was made, and its INT8 file made channels last again."""
    model = Path(model)
    if not model.is_file():
        raise DaflError(f"{model}: no such file")
    out = Path(out) if out else model.with_name(f"{model.stem}.int8.onnx")
    source = from_file(calibration)
    for existing in (out, rejected_path(out)):
        if existing.exists() and not force:
            raise DaflError(f"{existing}: exists (use --force to replace it)")
    judged = {"samples": samples, "eval_data": eval_data, "task": task, "mean": mean,
              "std": std, "head": head}  # fmt: skip
    if not is_channels_last(model):
        return _quantize_file(model, source, out, **judged)
    with tempfile.TemporaryDirectory(prefix="dafl-quantize-") as folder:
        first = Path(folder) / model.name  # rows name the user's file
        channels_first_copy(model, first)
        shape = _input_shape(first, None)
        from_nhwc = CalibrationSource(lambda n: np.ascontiguousarray(
            np.asarray(source.draw(n)).transpose(0, 3, 1, 2)), source.what)  # fmt: skip
        result, rows = _quantize_file(first, from_nhwc, out, **judged)
    try:
        take_channels_last_input(result.path, shape)
    except BaseException:  # never leave an INT8 file that takes another layout than its model
        result.path.unlink(missing_ok=True)
        raise
    return result, rows


def _quantize_file(model: Path, source: CalibrationSource, out: Path, *, samples: int,
                   eval_data: Path | None, task: str | None, mean: Any, std: Any,
                   head: str | None) -> tuple[Int8Result, list[ModelRow]]:  # fmt: skip
    shape = _input_shape(model, None)
    data, kind = None, get_task(task or "classification").with_head(head) if task or head else None
    if kind is not None and kind.joins_outputs:  # a detection head: its layout from the file
        from compress_toolbox.load.teacher import load_teacher

        kind = kind.bound_to(load_teacher(model, join_outputs=True))
    if eval_data is not None:
        output = _output_shape(model, shape)
        kind = kind or task_of_output(output) or get_task("classification")
        data = kind.load_eval_data(Path(eval_data), shape, InputDomain.from_options(mean, std,
                                   shape), kind.classes_of(output))  # fmt: skip
    for stale in (out, rejected_path(out)):  # only once the inputs were read
        stale.unlink(missing_ok=True)
    result = quantize_model(model, out, source, samples=samples, eval_data=data, input_shape=shape,
                            task=kind)  # fmt: skip
    params = onnx_params(model)
    return result, [float_row("fp32", model, params, shape, data, kind),
                    int8_row("int8", result, params, shape)]  # fmt: skip


def onnx_params(model: Path) -> int:
    """Parameters of a float ONNX model: the elements of its floating-point weights."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    return int(sum(np.prod(t.dims) for t in graph.initializer if t.data_type in floats))


def _output_shape(model: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The first output's shape without the batch, from one run (at the file's fixed batch)."""
    session = onnx_session(model)
    x = random_inputs(shape, session_batch(session) or 1).numpy()
    return tuple(session.run(None, {session.get_inputs()[0].name: x})[0].shape[1:])
