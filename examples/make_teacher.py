"""Train the embedded default teacher and export it the way torch 2.14 does by default.

    python examples/make_teacher.py            # -> examples/teacher.onnx, examples/eval.npz

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (installed with apt-get when
missing and possible), train set for the teacher, test set written as evaluation data; if it
cannot be had, scikit-learn's bundled 8x8 digits instead (said so on screen). The teacher is
LeNet-5 from the model zoo, trained on pixels normalised outside the model with the
training set's mean and std (0.2860 and 0.3530 for Fashion-MNIST), as many users' models are;
eval.npz holds the raw uint8 test images, so dafl-compress is told the normalisation:
``--mean 0.2860 --std 0.3530`` (scripts/demo.sh does). Takes under a minute on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled
from model_zoo import get_model  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
HERE = Path(__file__).resolve().parent
MEAN, STD = 0.2860, 0.3530


def _read_idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _install_fashion_mnist() -> bool:
    if (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        return True
    if shutil.which("apt-get") is None:
        return False
    print("installing Debian's dataset-fashion-mnist (apt-get) ...", flush=True)
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"],
    ):
        if subprocess.run(command, capture_output=True).returncode != 0:
            return False
    return (FASHION_DIR / "train-images-idx3-ubyte.gz").exists()


def load_data() -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(name, train x uint8 (N,H,W), train y, test x, test y)."""
    if _install_fashion_mnist():
        d = FASHION_DIR
        return (
            "Fashion-MNIST",
            _read_idx(d / "train-images-idx3-ubyte.gz"),
            _read_idx(d / "train-labels-idx1-ubyte.gz"),
            _read_idx(d / "t10k-images-idx3-ubyte.gz"),
            _read_idx(d / "t10k-labels-idx1-ubyte.gz"),
        )
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("examples/make_teacher.py: neither Fashion-MNIST nor scikit-learn is "
                         'available: pip install -e ".[demo]" (scripts/demo.sh does)') from None
    print("Fashion-MNIST unavailable (no apt-get or no network): using scikit-learn's digits")

    digits = load_digits()
    x = (digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], digits.target[order]
    return "sklearn digits", x[:1400], y[:1400], x[1400:], y[1400:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "teacher.onnx")
    parser.add_argument("--eval-out", type=Path, default=HERE / "eval.npz")
    args = parser.parse_args()
    torch.manual_seed(0)
    name, x_train, y_train, x_test, y_test = load_data()
    mean, std = MEAN, STD  # Fashion-MNIST's training-set statistics (fixed: demo.sh passes them)

    def prepare(x: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(np.array(x)).float() / 255 - mean) / std).unsqueeze(1)

    xt, yt = prepare(x_train), torch.from_numpy(y_train.astype(np.int64))
    xe, ye = prepare(x_test), torch.from_numpy(y_test.astype(np.int64))
    size = tuple(xt.shape[2:])
    model = get_model("lenet5", num_classes=10, in_channels=1, input_size=size)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = args.epochs * (len(xt) // 256)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 6e-3, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(xt))
        for i in range(len(xt) // 256):
            batch = order[i * 256 : (i + 1) * 256]
            loss = nn.functional.cross_entropy(model(xt[batch]), yt[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(xe).argmax(1) == ye).float().mean().item()
        print(
            f"epoch {epoch + 1}/{args.epochs}: test accuracy {accuracy:.4f} "
            f"({time.time() - start:.0f} s)",
            flush=True,
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(  # torch 2.14's default exporter (dynamo, opset 20)
            model,
            (xe[:2],),
            dynamo=True,
            input_names=["input"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
        program.save(str(args.out))
    np.savez_compressed(args.eval_out, x=x_test, y=y_test)
    print(
        f"{name} LeNet-5 teacher, test accuracy {accuracy:.4f}: wrote {args.out} and "
        f"{args.eval_out} (raw test images; the teacher wants (x - {mean:.4f}) / {std:.4f}: "
        f"--mean {mean:.4f} --std {std:.4f})"
    )


if __name__ == "__main__":
    main()
