"""Which INT8 calibration should compress_toolbox.export.quantize use by default?

    PYTHONPATH=. python benchmarks/bench_int8.py [--models cnn8 lenet5 wide16] [--steps 300]

Trains small classifiers on sklearn's digits (8x8 CNN; LeNet-5 on digits upsampled to 32x32; a
wider VGG-like net at 16x16), exports each to ONNX (dynamic batch), and quantises it with
MinMax, Entropy and Percentile calibration on 256 and 1024 samples, calibrating on uniform
noise in [0, 1] (the data's range, nothing else: what a data-free run has before its generator
is any good), on standard normal noise (an untrained generator's BatchNorm output, off the
data's range), or on the digits training images (real-looking inputs: a good generator).
Reports the held-out accuracy of fp32 and int8, argmax agreement, mean absolute logit
difference, file-size ratio, calibration time (pre-processing included); then
the batch-1 and batch-32 latency (medians, onnxruntime CPU, 1 thread) of fp32 vs int8 with
uint8 and int8 activations. One seed: digits' 397 test images make 1 point = 4 images.
Fashion-MNIST is used when the Debian package dataset-fashion-mnist is installed (it is not on
the machine this was written on, so it is skipped).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from compress_toolbox.export.onnx_compare import compare_onnx, latency_ms  # noqa: E402
from compress_toolbox.export.quantize import quantize_onnx  # noqa: E402

METHODS = ("MinMax", "Entropy", "Percentile")
SAMPLES = (256, 1024)
HEADER = (
    "| model  | calib  | method     | n    | fp32 | int8 | delta | agree | dlogit   | size "
    "| calib s |\n|--------|--------|------------|------|------|------|-------|-------|"
    "----------|------|---------|"
)


def digits(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits in [0, 1], 1 x size x size (bilinear upsampling from 8x8), train / test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy((data.images / 16.0).astype(np.float32))[:, None]
    if size != 8:
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear")
    x, y = images.numpy(), data.target.astype(np.int64)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def make_model(name: str) -> tuple[nn.Module, int]:
    """(untrained model, input size)."""
    if name == "cnn8":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10)), 8  # fmt: skip
    if name == "lenet5":
        return nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, 10)), 32  # fmt: skip
    if name == "wide16":

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        return nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
            nn.MaxPool2d(2), *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, 10)), 16  # fmt: skip
    raise SystemExit(f"unknown model {name!r}")


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int) -> nn.Module:
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(xt), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(xt[pick]), yt[pick])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def export(model: nn.Module, size: int, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, 1, size, size),), str(path), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    return path


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(np.mean(session.run(None, {"input": x})[0].argmax(1) == y))


def calibration_sets(x_train: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    real = x_train[rng.permutation(len(x_train))]
    real = np.concatenate([real, real[: max(SAMPLES) - len(real)]])  # 1400 -> enough for 1024
    shape = (max(SAMPLES), *x_train.shape[1:])
    return {"noise": rng.random(shape, dtype=np.float32),  # uniform [0, 1]: the data's range
            "gauss": rng.standard_normal(shape, dtype=np.float32),  # an untrained generator's
            "digits": real}  # fmt: skip


def bench_model(name: str, steps: int, work: Path) -> list[dict]:
    """One row per (calibration source, method, samples) for model ``name``."""
    torch.manual_seed(0)
    model, size = make_model(name)
    x, y, x_test, y_test = digits(size)
    start = time.perf_counter()
    fp32 = export(train(model, x, y, steps), size, work / f"{name}.onnx")
    print(f"# {name}: trained {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    fp32_acc, rows = accuracy(fp32, x_test, y_test), []
    for source, inputs in calibration_sets(x).items():
        for method in METHODS:
            for samples in SAMPLES:
                out = work / f"{name}.{source}.{method}.{samples}.int8.onnx"
                result = quantize_onnx(fp32, out, inputs, method=method, samples=samples)
                agree = compare_onnx(fp32, out, x_test)
                rows.append(dict(model=name, source=source, method=method, samples=samples,
                                 fp32=fp32_acc, int8=accuracy(out, x_test, y_test),
                                 agree=agree.top1, mad=agree.mean_abs_diff,
                                 size=result.size_ratio,
                                 calib_s=result.seconds))  # fmt: skip
                print(format_row(rows[-1]), flush=True)
    return rows


def format_row(r: dict) -> str:
    delta = 100 * (r["int8"] - r["fp32"])
    return (f"| {r['model']:6} | {r['source']:6} | {r['method']:10} | {r['samples']:4} | "
            f"{100 * r['fp32']:4.1f} | {100 * r['int8']:4.1f} | {delta:+5.1f} "
            f"| {100 * r['agree']:5.1f} | {r['mad']:8.3f} | {r['size']:.2f} "
            f"| {r['calib_s']:5.2f} |")  # fmt: skip


def bench_latency(name: str, work: Path, x: np.ndarray) -> str:
    """fp32 vs int8 (uint8 and int8 activations) at batch 1 and 32, medians in ms."""
    fp32 = work / f"{name}.onnx"
    cells = []
    for batch, runs in ((1, 200), (32, 40)):
        feed = np.ascontiguousarray(x[:batch])
        base = latency_ms(fp32, feed, runs=runs)
        cells.append(f"b{batch} fp32 {base:.3f} ms")
        for act in ("uint8", "int8"):
            out = work / f"{name}.lat.{act}.int8.onnx"
            if not out.exists():
                quantize_onnx(fp32, out, x, method="MinMax", samples=256, activations=act)
            cells.append(f"{act} x{latency_ms(out, feed, runs=runs) / base:.2f}")
    return f"{name}: " + ", ".join(cells)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn8", "lenet5", "wide16"])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if Path("/usr/share/doc/dataset-fashion-mnist").exists():
        print("# dataset-fashion-mnist is installed but not wired in yet: skipped")
    else:
        print("# Fashion-MNIST: dataset-fashion-mnist not installed, skipped")
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        work, latencies = Path(tmp), []
        for name in args.models:
            bench_model(name, args.steps, work)
            latencies.append(bench_latency(name, work, digits(make_model(name)[1])[0]))
        print("\n# latency, onnxruntime CPU, 1 thread, int8/fp32 ratio of medians")
        print("\n".join(latencies))


if __name__ == "__main__":
    main()
