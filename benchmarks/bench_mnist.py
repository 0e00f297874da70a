"""MNIST benchmark: LeNet-5 teacher -> LeNet-5-half student without data (DAFL vs noise KD).

The teacher is trained on the EVEN-indexed 5,000 images of the MNIST 10k test set and every
student is evaluated on the ODD-indexed 5,000 (the only MNIST copy shipped with this repo).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from common import METHODS, REPO, cached_teacher, compare, lenet, load_idx_pair, train_classifier

from compress_toolbox.distill import PRESETS
from compress_toolbox.evaldata import EvalData

DATA = REPO.parent / "shared" / "data" / "mnist"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=float, default=180.0, help="seconds per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated labels")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the fast preset (tuning), e.g. batch_size=128",
    )
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    images, labels = DATA / "t10k-images-idx3-ubyte.gz", DATA / "t10k-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        print(f"MNIST test set not found under {DATA}; skipping the benchmark")
        return 0
    x, y = load_idx_pair(images, labels)
    x_train, y_train, x_eval, y_eval = x[0::2], y[0::2], x[1::2], y[1::2]
    print(f"MNIST 10k test set split: teacher trained on the {len(x_train)} even-indexed images, "
          f"students evaluated on the {len(x_eval)} odd-indexed ones")  # fmt: skip
    teacher = cached_teacher(
        "mnist_lenet5_even5k",
        lambda: lenet("lenet5"),
        lambda m: train_classifier(m, x_train, y_train, epochs=15, lr=3e-3),
    )
    methods = {label: METHODS[label] for label in args.methods.split(",")}
    if args.set:
        fields = {f.name: f.type for f in dataclasses.fields(PRESETS["fast"])}
        changes = {}
        for item in args.set:
            key, value = item.split("=", 1)
            if key not in fields:
                sys.exit(f"unknown preset field {key}")
            changes[key] = json.loads(value) if value[0] in "0123456789-.[" else value
        tuned = dataclasses.replace(PRESETS["fast"], **changes)
        print(f"fast preset overrides: {changes}")
        methods = {label: (m, tuned if p == "fast" and m == "dafl" else p)
                   for label, (m, p) in methods.items()}  # fmt: skip
    compare(teacher, (1, 32, 32), lambda: lenet("lenet5_half"), EvalData(x_eval, y_eval),
            budget=args.budget, seeds=args.seeds, methods=methods,
            progress=args.progress)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
