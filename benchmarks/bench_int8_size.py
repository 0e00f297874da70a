"""INT8 file size and latency of the suite's derived students (issue 27's <= 0.3x size and
<= 0.7x batch-32 latency targets), without training.

    python benchmarks/bench_int8_size.py [--teachers lenet5-fashion resnet8-fashion]

For each teacher of benchmarks/teachers/make_suite.py, built untrained and exported to ONNX
(opset 17: a file's size and its latency do not depend on its weights' values): the derived
student as ``dafl-compress student`` writes it, quantised by ``quantize_onnx`` as
``--quantize int8`` does (narrow convolutions kept float) and with every convolution quantised
(``min_conv_channels=0``), calibrated on 1,024 uniform-noise inputs. Prints float and INT8
bytes, their ratio, and onnxruntime CPU latency (one thread, median of 3 medians of 100 runs)
at batch 1 and 32. Run it alone: it quotes times.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "teachers"))

import make_suite  # noqa: E402

from compress_toolbox.export.onnx_compare import latency_ms  # noqa: E402
from compress_toolbox.export.quantize import quantize_onnx  # noqa: E402


def student_onnx(spec: make_suite.Spec, work: Path) -> Path:
    """The untrained teacher of ``spec`` exported to ONNX, and its derived student's file."""
    teacher, student = work / f"{spec.name}.onnx", work / f"{spec.name}.student.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.build().eval(), (torch.zeros(2, *spec.input_shape),),
                          str(teacher), dynamo=False, opset_version=17, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})  # fmt: skip
    subprocess.run(["dafl-compress", "student", str(teacher), "--out", str(student), "--force"],
                   check=True, capture_output=True)  # fmt: skip
    return student


def latency(model: Path, x: np.ndarray) -> float:
    return statistics.median(latency_ms(model, x, runs=100) for _ in range(3))


def row(spec: make_suite.Spec, work: Path) -> str:
    """One table row: sizes and latencies of float, INT8 and INT8 with every conv quantised."""
    student = student_onnx(spec, work)
    inputs = np.random.default_rng(0).random((1024, *spec.input_shape), dtype=np.float32)
    kept = quantize_onnx(student, work / f"{spec.name}.int8.onnx", inputs)
    every = quantize_onnx(student, work / f"{spec.name}.all.onnx", inputs, min_conv_channels=0)
    cells = [spec.name, f"{student.stat().st_size:,}"]
    for result in (kept, every):
        cells.append(f"{result.size_bytes:,} ({result.size_ratio:.3f})")
    for batch in (1, 32):
        base = latency(student, inputs[:batch])
        cells.append(f"{base:.3f}")
        cells += [f"{latency(r.path, inputs[:batch]) / base:.2f}x" for r in (kept, every)]
    cells.append(str(sum(op == "Conv" for _, op in kept.kept_float)))
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="*", help="suite names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    specs = [s for s in make_suite._specs() if not args.teachers or s.name in args.teachers]
    print("| teacher | student fp32 bytes | int8 bytes (ratio) | int8, every conv (ratio) "
          "| fp32 batch 1 ms | int8 | int8, every conv | fp32 batch 32 ms | int8 "
          "| int8, every conv | convs kept float |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for spec in specs:
            print(row(spec, Path(work)), flush=True)


if __name__ == "__main__":
    main()
