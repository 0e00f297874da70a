"""INT8 file sizes of the suite's derived students (issue 27's <= 0.3x target), without training.

    python benchmarks/bench_int8_size.py [--teachers lenet5-fashion mlp-digits resnet8-fashion]

For each teacher of benchmarks/teachers/out/suite.json (make_suite.py builds them): the derived
student as ``dafl-compress student`` writes it (untrained: a file's size does not depend on its
weights' values), quantised by ``quantize_onnx`` as ``--quantize int8`` does, calibrated on
1,024 uniform-noise inputs. Prints float and INT8 bytes and their ratio, and the ops left float.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from compress_toolbox.export.quantize import quantize_onnx  # noqa: E402

SUITE = HERE / "teachers" / "out" / "suite.json"


def student_sizes(entry: dict, work: Path) -> tuple[int, int, tuple]:
    """(float bytes, INT8 bytes, ops left float) of ``entry``'s derived student."""
    student = work / f"{entry['name']}.student.onnx"
    subprocess.run(["dafl-compress", "student", str(SUITE.parent / entry["file"]), "--out",
                    str(student), "--force"], check=True, capture_output=True)  # fmt: skip
    inputs = np.random.default_rng(0).random((1024, *entry["input_shape"]), dtype=np.float32)
    result = quantize_onnx(student, work / f"{entry['name']}.student.int8.onnx", inputs)
    return student.stat().st_size, result.size_bytes, result.float_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="*", help="suite names (default: all built)")
    args = parser.parse_args()
    if not SUITE.is_file():
        raise SystemExit(f"{SUITE} missing: run benchmarks/teachers/make_suite.py first")
    entries = [e for e in json.loads(SUITE.read_text())
               if not args.teachers or e["name"] in args.teachers]  # fmt: skip
    print("| teacher | student fp32 bytes | student int8 bytes | ratio | ops left float |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for entry in entries:
            fp32, int8, left = student_sizes(entry, Path(work))
            ops = ", ".join(op for _, op in left) or "-"
            print(f"| {entry['name']} | {fp32:,} | {int8:,} | {int8 / fp32:.3f} | {ops} |")


if __name__ == "__main__":
    main()
