"""Stage 5: export the student (ONNX, torch.export, state_dict) and verify the ONNX file."""

from __future__ import annotations

import contextlib
import io
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from torch import nn

from compress_toolbox.errors import DaflError
from compress_toolbox.export.verification import EXPORT_BATCHES, compare, random_inputs

if TYPE_CHECKING:
    from compress_toolbox.load.teacher import Teacher

DEFAULT_OPSET = 20  # what torch 2.14's default (dynamo) exporter writes
LEGACY_OPSET = 17  # the TorchScript-based exporter: on request, and for quick measurements


@dataclass
class ExportResult:
    onnx_path: Path
    opset: int
    onnx_bytes: int
    max_abs_diff: float
    max_rel_diff: float
    pt2_skipped: str | None = None  # why no student.pt2 was written, if none was


SUPPORTED_OPSETS = range(11, 23)


def check_opset(opset: int | None) -> None:
    """DaflError for an opset we cannot write (checked before any training)."""
    if opset is not None and opset not in SUPPORTED_OPSETS:
        raise DaflError(f"--opset {opset} is not supported (use 11-17 or 18-22)")


def export_program(module: nn.Module, input_shape: tuple[int, ...]):
    """``torch.export`` of ``module`` with a dynamic batch (shared by the .pt2 and ONNX files)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(
            module.eval().cpu(),
            (random_inputs(input_shape, 2),),  # batch 2: a batch of 1 would be specialised
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )


def traceable_program(module: nn.Module, input_shape: tuple[int, ...]):
    """``export_program``, or None when torch.export cannot trace ``module`` (some imported
    ops read their constant inputs with ``.tolist()``/``.numpy()``, which torch.export's
    symbolic tracing refuses: onnx2torch's Slice and Resize). torch prints the partial graph
    of a failed trace on stderr (1,200 lines for a text detector): it is held back and issued
    as a RuntimeWarning, which the CLI shows only with --debug."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            return export_program(module, input_shape)
    except Exception as error:
        warnings.warn(f"torch.export cannot trace the model ({type(error).__name__}); "
                      f"what torch printed:\n{held.getvalue()}", RuntimeWarning, 2)  # fmt: skip
        return None


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop what only a debugger reads (in place): the dynamo exporter writes each node's
    Python stack trace, FX node and class path (paths of this machine, too) and every
    intermediate shape. They made a 487-byte network a 6 kB file, larger than its teacher."""
    graph = model.graph
    for item in (*graph.node, *graph.input, *graph.output, *graph.initializer):
        del item.metadata_props[:]
        item.doc_string = ""
    del graph.value_info[:]
    del graph.metadata_props[:]
    graph.doc_string = ""


def export_onnx(
    module: nn.Module,
    input_shape: tuple[int, ...],
    path: str | Path,
    *,
    opset: int | None = None,
    program=None,
    what: str = "the student",
) -> Path:
    """Write ``module`` as a single-file ONNX model with a dynamic batch dimension.

    ``opset`` None or >= 18 uses torch's default (dynamo) exporter, from ``program`` (its
    ``torch.export``) when given; 11-17 the legacy (TorchScript-based) one. With ``opset``
    None, a module torch.export cannot trace is written by the legacy exporter at opset 17.
    ``what`` names the model in errors.
    """
    check_opset(opset)
    path = Path(path)
    module = module.eval().cpu()
    example = random_inputs(input_shape, 2)  # batch 2: an example batch of 1 makes the batch static
    names = {"input_names": ["input"], "output_names": ["output"]}
    if opset is None and program is None:
        program = traceable_program(module, input_shape)
        opset = None if program is not None else LEGACY_OPSET
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if opset is None or opset >= 18:
                program = program or export_program(module, input_shape)
                onnx_program = torch.onnx.export(program, (example,), dynamo=True,
                                                 opset_version=opset or DEFAULT_OPSET,
                                                 verbose=False, **names)  # fmt: skip
                onnx_program.save(str(path))
            else:
                axes = {"input": {0: "batch"}, "output": {0: "batch"}}
                torch.onnx.export(module, (example,), str(path), dynamo=False,
                                  opset_version=opset, dynamic_axes=axes, **names)  # fmt: skip
        except DaflError:
            raise
        except Exception as error:
            raise DaflError(f"cannot export {what} to ONNX: {error}") from error
    # One self-contained file: fold any external-data file back in (students are small).
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:  # torch.export names it "s6" or the like
            dims[0].dim_param = "batch"
    strip_debug_info(model)
    onnx.save_model(model, str(path), save_as_external_data=False)
    for stray in path.parent.glob(path.name + ".data"):
        stray.unlink()
    return path


def onnx_session(model: str | Path | bytes, *, optimised: bool = True):
    """An onnxruntime CPU session on a file (or a serialised model), its log kept quiet;
    without ``optimised``, the graph runs as written (no fusion or constant folding)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures come back as exceptions, which we word ourselves
    if not optimised:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def verify_onnx(module: nn.Module, path: str | Path, input_shape: tuple[int, ...],
                source: str | Path | None = None) -> tuple:  # fmt: skip
    """Compare onnxruntime on ``path`` with ``module`` at batch 1 and 7; (abs, rel) diffs.
    Messages name ``source`` (the file as the user will find it), else ``path``."""
    from compress_toolbox.load.importers.base import torch_runner  # lazy: importers/ import this

    session = onnx_session(path)
    input_name = session.get_inputs()[0].name

    def run_onnx(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: x})[0]

    return compare(run_onnx, torch_runner(module.eval().cpu()), input_shape, source=source or path,
                   what="ONNX export (onnxruntime)", batches=EXPORT_BATCHES, seed=11)  # fmt: skip


def export_pt2(module: nn.Module, input_shape: tuple[int, ...], path: str | Path,
               program=None) -> Path:  # fmt: skip
    """Save ``module`` (or its ``program``) as a torch.export archive with a dynamic batch."""
    program = program or traceable_program(module, input_shape)
    if program is None:
        raise DaflError(
            "cannot write a torch.export archive (.pt2) of this model: torch.export "
            "cannot trace it (an imported op reads constants); write .onnx instead"
        )
    torch.export.save(program, path)
    return Path(path)


def export_student(
    student: nn.Module, input_shape: tuple[int, ...], out_dir: str | Path, *, opset=None
) -> ExportResult:
    """Write student.onnx (verified), student.pt2 and student_state_dict.pt into ``out_dir``;
    no student.pt2 when torch.export cannot trace the student (``ExportResult.pt2_skipped``
    says why; student.onnx then comes from the legacy exporter)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    student = student.eval().cpu()
    program = traceable_program(student, input_shape)  # traced once for both files
    if program is None:
        if opset is not None and opset >= 18:
            raise DaflError(f"cannot export the student at opset {opset}: torch.export cannot "
                            f"trace it; use --opset {LEGACY_OPSET}")  # fmt: skip
        opset = opset or LEGACY_OPSET
    onnx_path = export_onnx(student, input_shape, out_dir / "student.onnx", opset=opset,
                            program=program)  # fmt: skip
    # written under a temporary folder name: messages name the file as the user will find it
    max_abs, max_rel = verify_onnx(student, onnx_path, input_shape, source="student.onnx")
    torch.save(student.state_dict(), out_dir / "student_state_dict.pt")
    skipped = None
    if program is not None:
        export_pt2(student, input_shape, out_dir / "student.pt2", program=program)
    else:
        skipped = "torch.export cannot trace the student (an imported op reads constants)"
    model = onnx.load(str(onnx_path), load_external_data=False)
    opset_used = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return ExportResult(onnx_path, opset_used, onnx_path.stat().st_size, max_abs, max_rel,
                        pt2_skipped=skipped)  # fmt: skip


def onnx_latency_ms(path: str | Path, input_shape: tuple[int, ...], repeats: int = 50,
                    seconds: float | None = None, batch: int | None = None) -> float:  # fmt: skip
    """Median onnxruntime CPU latency at ``batch`` (by default 1, or the batch the file fixes),
    in milliseconds (after a short warm-up), over ``repeats`` runs, or fewer (at least 5) once
    ``seconds`` have passed."""
    session = onnx_session(path)
    batch = batch or session_batch(session) or 1
    feed = {session.get_inputs()[0].name: random_inputs(input_shape, batch).numpy()}
    for _ in range(3):
        session.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + seconds if seconds is not None else float("inf")
    while len(times) < repeats and (len(times) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def session_batch(session) -> int | None:
    """The batch size a session's (first) input is fixed to, or None where it is free."""
    first = session.get_inputs()[0].shape[0]
    return first if isinstance(first, int) and first > 0 else None


def run_batched(session, feed: dict[str, np.ndarray], batch: int,
                outputs: list[str] | None = None) -> list[list[np.ndarray]]:  # fmt: skip
    """Every output of ``session`` (those named in ``outputs`` if given) for each chunk of the
    samples in ``feed`` (arrays sharing their first axis): ``batch`` samples per run, or the
    session's fixed batch, a short last chunk padded to it with copies of its last sample
    that its outputs then leave out."""
    fixed = session_batch(session)
    step, size = max(fixed or batch, 1), len(next(iter(feed.values())))
    chunks = []
    for start in range(0, size, step):
        part = {name: array[start : start + step] for name, array in feed.items()}
        count = min(step, size - start)
        if not fixed or count == fixed:
            chunks.append(session.run(outputs, part))
            continue
        part = {name: np.concatenate([array, np.repeat(array[-1:], fixed - count, axis=0)])
                for name, array in part.items()}  # fmt: skip
        chunks.append([out[:count] if out.shape[:1] == (fixed,) else out
                       for out in session.run(outputs, part)])  # fmt: skip
    return chunks


def onnx_predictions(path: str | Path, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Top-1 class of an ONNX classifier, run by onnxruntime (at its fixed batch if it has
    one), for every sample of ``x``."""
    session = onnx_session(path)
    feed = {session.get_inputs()[0].name: x.numpy()}
    chunks = [outputs[0].argmax(1) for outputs in run_batched(session, feed, batch)]
    return torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0, dtype=torch.long)


def teacher_onnx(teacher: Teacher, folder: Path) -> Path | None:
    """The teacher as an ONNX file to measure: its own file when it is ONNX, else exported into
    ``folder`` with the legacy exporter (~30x faster than dynamo); None when it cannot be
    exported (reported as n/a: a measurement never fails the run)."""
    if teacher.format == "onnx":
        return Path(teacher.source)
    try:
        return export_onnx(teacher.module, teacher.input_shape, folder / "teacher.onnx",
                           opset=LEGACY_OPSET, what="the teacher (to measure it)")  # fmt: skip
    except DaflError:
        return None
