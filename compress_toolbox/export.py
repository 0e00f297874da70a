"""Stage 5: export the student (ONNX, torch.export, state_dict) and verify the ONNX file."""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .errors import DaflError, VerificationFailed
from .importers.base import random_inputs

DEFAULT_OPSET = 20  # what torch 2.14's default (dynamo) exporter writes
LEGACY_OPSETS = (11, 13, 17)  # the TorchScript-based exporter, on request
VERIFY_BATCHES = (1, 7)
VERIFY_RTOL = 1e-4


@dataclass
class ExportResult:
    onnx_path: Path
    opset: int
    onnx_bytes: int
    max_abs_diff: float
    max_rel_diff: float


def export_onnx(
    module: nn.Module, input_shape: tuple[int, ...], path: str | Path, *, opset: int | None = None
) -> Path:
    """Write ``module`` as a single-file ONNX model with a dynamic batch dimension.

    ``opset`` None or >= 18 uses torch's default (dynamo) exporter; 11/13/17 the legacy one.
    """
    path = Path(path)
    module = module.eval().cpu()
    example = random_inputs(input_shape, 2)  # batch 2: an example batch of 1 makes the batch static
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if opset is None or opset >= 18:
                program = torch.onnx.export(
                    module,
                    (example,),
                    dynamo=True,
                    opset_version=opset or DEFAULT_OPSET,
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    verbose=False,
                )
                program.save(str(path))
            elif opset in LEGACY_OPSETS or 11 <= opset < 18:
                torch.onnx.export(
                    module,
                    (example,),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                )
            else:
                raise DaflError(f"--opset {opset} is not supported (use 11-17 or 18-22)")
        except DaflError:
            raise
        except Exception as error:
            raise DaflError(f"cannot export the student to ONNX: {error}") from error
    # One self-contained file: fold any external-data file back in (students are small).
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=False)
    for stray in path.parent.glob(path.name + ".data"):
        stray.unlink()
    return path


def onnx_session(path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(module: nn.Module, path: str | Path, input_shape: tuple[int, ...]) -> tuple:
    """Compare onnxruntime on ``path`` with ``module`` at batch 1 and 7; (abs, rel) diffs."""
    session = onnx_session(path)
    input_name = session.get_inputs()[0].name
    max_abs = max_rel = 0.0
    module = module.eval().cpu()
    for batch in VERIFY_BATCHES:
        x = random_inputs(input_shape, batch, seed=11)
        with torch.no_grad():
            expected = module(x).double().numpy()
        got = np.asarray(session.run(None, {input_name: x.numpy()})[0], dtype=np.float64)
        if got.shape != expected.shape:
            raise VerificationFailed(
                f"{path}: ONNX output {got.shape} != PyTorch {expected.shape} at batch {batch}"
            )
        diff = float(np.abs(got - expected).max())
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(float(np.abs(expected).max()), 1e-6))
    if max_rel > VERIFY_RTOL:
        raise VerificationFailed(
            f"{path}: onnxruntime differs from the PyTorch student by {max_rel:.2e} "
            f"(relative max, limit {VERIFY_RTOL:.0e})"
        )
    return max_abs, max_rel


def export_pt2(module: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """Save ``module`` as a torch.export archive with a dynamic batch dimension."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(
            module.eval().cpu(),
            (random_inputs(input_shape, 2),),  # batch 2: a batch of 1 would be specialised
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        torch.export.save(program, path)
    return Path(path)


def export_student(
    student: nn.Module, input_shape: tuple[int, ...], out_dir: str | Path, *, opset=None
) -> ExportResult:
    """Write student.onnx (verified), student.pt2 and student_state_dict.pt into ``out_dir``."""
    out_dir = Path(out_dir)
    student = student.eval().cpu()
    onnx_path = export_onnx(student, input_shape, out_dir / "student.onnx", opset=opset)
    max_abs, max_rel = verify_onnx(student, onnx_path, input_shape)
    torch.save(student.state_dict(), out_dir / "student_state_dict.pt")
    export_pt2(student, input_shape, out_dir / "student.pt2")
    model = onnx.load(str(onnx_path), load_external_data=False)
    opset_used = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return ExportResult(onnx_path, opset_used, onnx_path.stat().st_size, max_abs, max_rel)


def onnx_latency_ms(path: str | Path, input_shape: tuple[int, ...], repeats: int = 50) -> float:
    """Median onnxruntime CPU latency at batch 1, in milliseconds (after a short warm-up)."""
    session = onnx_session(path)
    feed = {session.get_inputs()[0].name: random_inputs(input_shape, 1).numpy()}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def onnx_accuracy(path: str | Path, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy of an ONNX classifier on (x, y), run by onnxruntime."""
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x), batch):
        logits = session.run(None, {name: x[start : start + batch].numpy()})[0]
        correct += int((logits.argmax(1) == y[start : start + batch].numpy()).sum())
    return correct / max(len(x), 1)
