"""Train and export the benchmark teacher suite (CPU, from the data this machine has).

    python benchmarks/teachers/make_suite.py [--only NAME ...] [--out DIR]

Writes DIR (default benchmarks/teachers/out/, not committed) with one teacher file per entry,
its evaluation set (.npz: raw uint8 images or [0, 1] features, as a user would pass them) and
``suite.json``, the manifest bench_suite.py reads: file, format, the CLI options the user would
give (--mean/--std, --model-class), MACs and the teacher's accuracy on its evaluation set.

Data: Fashion-MNIST (Debian's dataset-fashion-mnist; installed with apt-get when missing), the
MNIST test set at ../shared/data/mnist (teacher trained on its even-indexed 5,000 images,
evaluated on the odd-indexed 5,000; skipped when absent) and scikit-learn's digits. Teachers
that take 3x32x32 see Fashion-MNIST resized to 32x32 (bilinear) and repeated to 3 channels,
exactly what dafl-compress does to the 28x28 evaluation images. Already trained teachers are
kept (delete DIR to retrain). About 25 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from models import MLP, CifarResNet, MobileNetSmall, VGGSmall  # noqa: E402

from compress_toolbox.load.analysis import analyse  # noqa: E402
from compress_toolbox.tasks.evaldata import read_idx  # noqa: E402
from model_zoo import get_model  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass
class Spec:
    """One suite teacher: how to build, train and ship it."""

    name: str
    family: str
    data: str  # fashion | fashion32 | mnist | digits
    build: Callable[[], nn.Module]
    export: str  # onnx-dynamo | onnx-legacy | pt2 | torchscript | checkpoint
    input_shape: tuple[int, ...]
    epochs: int
    normalize_outside: bool  # True: the user gives --mean/--std; False: the model normalises
    model_class: str | None = None
    model_kwargs: dict = field(default_factory=dict)


def _specs() -> list[Spec]:
    fashion_norm = (FASHION_MEAN, FASHION_STD)
    return [
        Spec("lenet5-mnist", "LeNet-5", "mnist",
             lambda: get_model("lenet5", num_classes=10, in_channels=1, input_size=(32, 32)),
             "onnx-dynamo", (1, 32, 32), 15, True),
        Spec("lenet5-fashion", "LeNet-5", "fashion",
             lambda: get_model("lenet5", num_classes=10, in_channels=1, input_size=(28, 28)),
             "onnx-legacy", (1, 28, 28), 4, True),
        Spec("mlp-digits", "MLP", "digits", lambda: MLP(64, 10), "onnx-dynamo", (64,), 60, False),
        Spec("mobilenet-fashion32", "MobileNetV3-style", "fashion32",
             lambda: MobileNetSmall(3, 10), "checkpoint", (3, 32, 32), 4, True,
             model_class=f"{HERE / 'models.py'}:MobileNetSmall",
             model_kwargs={"in_channels": 3, "num_classes": 10}),
        Spec("vgg-fashion32", "VGG-BN", "fashion32",
             lambda: VGGSmall((16, 32, 64), 3, 10, 32, normalize=fashion_norm),
             "torchscript", (3, 32, 32), 4, False),
        Spec("resnet8-fashion32", "ResNet-8", "fashion32",
             lambda: CifarResNet((1, 1, 1), (16, 32, 64), 3, 10), "pt2", (3, 32, 32), 4, True),
        Spec("resnet8-fashion", "ResNet-8", "fashion",
             lambda: CifarResNet((1, 1, 1), (16, 32, 64), 1, 10), "onnx-dynamo", (1, 28, 28),
             4, True),
        Spec("resnet20-fashion", "ResNet-20", "fashion",
             lambda: CifarResNet((3, 3, 3), (16, 32, 64), 1, 10, normalize=fashion_norm),
             "onnx-dynamo", (1, 28, 28), 3, False),
    ]  # fmt: skip


def _fashion_dir() -> Path:
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists():
        print("installing Debian's dataset-fashion-mnist (apt-get) ...", flush=True)
        for command in (["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"]):  # fmt: skip
            subprocess.run(command, check=True)
    return FASHION_DIR


def load_raw(data: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, eval x, eval y): uint8 images (N, H, W) or float features (N, F)."""
    if data.startswith("fashion"):
        d = _fashion_dir()
        names = ("train-images", "train-labels", "t10k-images", "t10k-labels")
        kinds = ("idx3", "idx1", "idx3", "idx1")
        return tuple(read_idx(d / f"{n}-{k}-ubyte.gz") for n, k in zip(names, kinds))
    if data == "mnist":
        images = read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
        labels = read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
        images = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # LeNet-5's 32x32, as in the paper
        return images[0::2], labels[0::2], images[1::2], labels[1::2]
    if data == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32)
        order = np.random.default_rng(0).permutation(len(x))
        x, y = x[order], digits.target[order]
        return x[:1200], y[:1200], x[1200:], y[1200:]
    raise ValueError(data)


def to_input(x: np.ndarray, shape: tuple[int, ...], mean_std) -> torch.Tensor:
    """Raw data -> teacher input: the same steps as dafl-compress's evaluation data loader."""
    t = torch.from_numpy(np.array(x))
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if len(shape) == 3:
        t = t[:, None].expand(-1, shape[0], -1, -1)
        if tuple(t.shape[-2:]) != shape[1:]:
            t = F.interpolate(t, size=shape[1:], mode="bilinear", align_corners=False)
    if mean_std:
        t = (t - mean_std[0]) / mean_std[1]
    return t.contiguous()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """Adam with a one-cycle LR, batch 128; plain supervised training."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    model.train()
    start = time.time()
    for epoch in range(epochs):
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % max(1, epochs // 5) == 0:
            print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip
    model.eval()


def export(model: nn.Module, spec: Spec, path: Path) -> None:
    example = torch.zeros(2, *spec.input_shape)
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec.export == "onnx-dynamo":  # torch 2.14's default: opset 20, BatchNorm folded
            torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["input"],
                              dynamic_shapes=({0: batch},), verbose=False)  # fmt: skip
        elif spec.export == "onnx-legacy":
            axes = {"input": {0: "batch"}}
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], dynamic_axes=axes)  # fmt: skip
        elif spec.export == "pt2":
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path))
        elif spec.export == "torchscript":
            torch.jit.save(torch.jit.trace(model, example), str(path))
        elif spec.export == "checkpoint":
            torch.save(model.state_dict(), path)
        else:
            raise ValueError(spec.export)


SUFFIX = {"onnx-dynamo": ".onnx", "onnx-legacy": ".onnx", "pt2": ".pt2",
          "torchscript": ".ts", "checkpoint": ".pth"}  # fmt: skip


def make(spec: Spec, out: Path) -> dict | None:
    """Train (unless already there) and export one teacher; return its manifest entry."""
    if spec.data == "mnist" and not MNIST_DIR.is_dir():
        print(f"{spec.name}: skipped ({MNIST_DIR} not found)")
        return None
    path = out / f"{spec.name}{SUFFIX[spec.export]}"
    eval_path = out / f"{spec.name}-eval.npz"
    entry_path = out / f"{spec.name}.json"
    if path.exists() and eval_path.exists() and entry_path.exists():
        print(f"{spec.name}: already made")
        return json.loads(entry_path.read_text())
    mean_std = (FASHION_MEAN, FASHION_STD) if spec.data.startswith("fashion") else (
        (MNIST_MEAN, MNIST_STD) if spec.data == "mnist" else None)  # fmt: skip
    given = mean_std if spec.normalize_outside else None
    x_train, y_train, x_eval, y_eval = load_raw(spec.data)
    xt, yt = to_input(x_train, spec.input_shape, given), torch.from_numpy(y_train.astype(np.int64))
    xe, ye = to_input(x_eval, spec.input_shape, given), torch.from_numpy(y_eval.astype(np.int64))
    torch.manual_seed(0)
    model = spec.build()
    print(f"{spec.name}: training {spec.family} on {len(xt)} samples", flush=True)
    train(model, xt, yt, spec.epochs)
    with torch.no_grad():
        accuracy = float((model(xe).argmax(1) == ye).float().mean())
    export(model, spec, path)
    np.savez_compressed(eval_path, x=x_eval, y=y_eval)
    entry = {
        "name": spec.name, "family": spec.family, "file": path.name, "format": spec.export,
        "input_shape": list(spec.input_shape), "eval": eval_path.name,
        "mean": [given[0]] if given else None, "std": [given[1]] if given else None,
        "normalisation": "outside (--mean/--std)" if given else (
            "inside the model" if mean_std else "none (features in [0, 1])"),
        "model_class": spec.model_class, "model_kwargs": spec.model_kwargs or None,
        "input_shape_option": ",".join(map(str, spec.input_shape))
        if spec.export == "checkpoint" else None,  # a state_dict does not record it
        "macs": analyse(model, spec.input_shape).macs, "batchnorm": any(
            isinstance(m, nn.BatchNorm2d) for m in model.modules()),
        "teacher_accuracy": accuracy, "data": spec.data,
    }  # fmt: skip
    entry_path.write_text(json.dumps(entry, indent=1))
    print(f"{spec.name}: accuracy {accuracy:.4f}, {entry['macs'] / 1e6:.2f} M MACs -> {path}")
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--only", nargs="*", help="names of teachers to make")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in _specs():
        if not args.only or spec.name in args.only:
            make(spec, args.out)
            write_manifest(args.out)  # after each teacher: benchmarks can start on the first ones
    return 0


def write_manifest(out: Path) -> None:
    """suite.json: the entries of every teacher made so far, in the suite's order."""
    order = [spec.name for spec in _specs()]
    entries = [json.loads((out / f"{name}.json").read_text()) for name in order
               if (out / f"{name}.json").exists()]  # fmt: skip
    tmp = out / "suite.json.tmp"
    tmp.write_text(json.dumps(entries, indent=1))
    shutil.move(tmp, out / "suite.json")
    print(f"manifest: {out / 'suite.json'} ({len(entries)} teachers)")


if __name__ == "__main__":
    sys.exit(main())
