"""Fashion-MNIST benchmark: LeNet-5 and a small ResNet teacher -> half-width students, no data.

Teachers are trained (a few epochs, cached) on the Fashion-MNIST train set from Debian's
``dataset-fashion-mnist`` package; students are evaluated on its 10k test set.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import (
    METHODS,
    SmallResNet,
    cached_teacher,
    compare,
    lenet,
    load_idx_pair,
    train_classifier,
)

from compress_toolbox.evaldata import EvalData

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def find_fashion() -> Path | None:
    """The package's data folder (from dpkg -L), installing the package if it is missing."""
    for attempt in range(2):
        try:
            files = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True,
                                   text=True, check=True).stdout.split()  # fmt: skip
            hits = [Path(f) for f in files if f.endswith("t10k-images-idx3-ubyte.gz")]
            if hits:
                return hits[0].parent
        except (OSError, subprocess.CalledProcessError):
            pass
        if attempt == 0:
            print("dataset-fashion-mnist not installed; trying apt-get install -y ...")
            try:
                subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"], check=True)
            except (OSError, subprocess.CalledProcessError) as error:
                print(f"could not install dataset-fashion-mnist ({error})")
                return None
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=float, default=180.0, help="seconds per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--teachers", default="lenet5,resnet")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    folder = find_fashion()
    if folder is None:
        print("Fashion-MNIST not available; skipping the benchmark")
        return 0
    load = lambda split: load_idx_pair(folder / f"{split}-images-idx3-ubyte.gz",  # noqa: E731
                                       folder / f"{split}-labels-idx1-ubyte.gz",
                                       mean=FASHION_MEAN, std=FASHION_STD)  # fmt: skip
    x_train, y_train = load("train")
    x_test, y_test = load("t10k")
    print(f"Fashion-MNIST from {folder}: teachers trained on {len(x_train)} train images, "
          f"students evaluated on the {len(x_test)} test images")  # fmt: skip
    eval_data = EvalData(x_test, y_test)
    methods = {label: METHODS[label] for label in args.methods.split(",")}
    teachers = {
        # name: (teacher, student, epochs, training images) - sized for a 2-core CPU
        "lenet5": (lambda: lenet("lenet5"), lambda: lenet("lenet5_half"), 2, 60000),
        "resnet": (lambda: SmallResNet((16, 32, 64)), lambda: SmallResNet((8, 16, 32)), 2, 20000),
    }
    for name in args.teachers.split(","):
        build, make_student, epochs, n_train = teachers[name]
        print(f"\n=== teacher {name} ===")

        def train(model, epochs=epochs, n=n_train, name=name):
            print(f"training teacher {name}: {epochs} epochs on the first {n} train images")
            return train_classifier(model, x_train[:n], y_train[:n], epochs=epochs, lr=3e-3)

        teacher = cached_teacher(f"fashion_{name}_{n_train}x{epochs}", build, train)
        compare(teacher, (1, 32, 32), make_student, eval_data, budget=args.budget,
                seeds=args.seeds, methods=methods, progress=args.progress)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
