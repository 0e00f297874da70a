"""A segmentation data set built from Fashion-MNIST (no segmentation data can be downloaded here).

Each sample is a 64x64 gray canvas: a noisy background with 1-3 garments pasted at random
positions and scales (18-36 px, later garments occlude earlier ones); its mask holds the
garment's class + 1 on every garment pixel (brighter than 0.1) and 0 (background) elsewhere:
11 classes. Training canvases use the 60k training garments, evaluation canvases the 10k test
garments, so the teacher never saw an evaluation garment.

    python benchmarks/make_segmentation_data.py --out seg_eval.npz --count 1000 --split test
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compress_toolbox.tasks.evaldata import read_idx  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SIZE = 64
NUM_CLASSES = 11  # background + 10 garments
CLASS_NAMES = ("background", "t-shirt", "trouser", "pullover", "dress", "coat", "sandal",
               "shirt", "sneaker", "bag", "ankle boot")  # fmt: skip


def fashion_garments(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels) of Fashion-MNIST's ``train`` or ``test`` split;
    installs Debian's dataset-fashion-mnist with apt-get when missing."""
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists():
        print("installing Debian's dataset-fashion-mnist (apt-get) ...", flush=True)
        for command in (["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"]):  # fmt: skip
            subprocess.run(command, check=True)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    return images, labels


def make_canvases(images: np.ndarray, labels: np.ndarray, count: int,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``count`` canvases (uint8 (count, 64, 64)) and masks (uint8 (count, 64, 64))."""
    rng = np.random.default_rng(seed)
    garments = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0)[:, None]
    x = np.empty((count, SIZE, SIZE), dtype=np.uint8)
    y = np.zeros((count, SIZE, SIZE), dtype=np.uint8)
    for i in range(count):
        canvas = rng.uniform(0.0, 0.15) + rng.normal(0.0, 0.06, (SIZE, SIZE))
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        for _ in range(rng.integers(1, 4)):
            index = int(rng.integers(len(garments)))
            side = int(rng.integers(18, 37))
            patch = F.interpolate(garments[index : index + 1], size=(side, side),
                                  mode="bilinear", align_corners=False)[0, 0].numpy()  # fmt: skip
            top, left = rng.integers(0, SIZE - side + 1, size=2)
            where = patch > 0.1
            region = (slice(top, top + side), slice(left, left + side))
            canvas[region][where] = patch[where]
            mask[region][where] = int(labels[index]) + 1
        x[i] = np.clip(canvas * 255.0, 0, 255).astype(np.uint8)
        y[i] = mask
    return x, y


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help=".npz with x (N,64,64) uint8, y masks")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images, labels = fashion_garments(args.split)
    x, y = make_canvases(images, labels, args.count, args.seed)
    np.savez_compressed(args.out, x=x, y=y)
    print(f"{args.out}: {len(x)} canvases from the {args.split} garments")
    return 0


if __name__ == "__main__":
    sys.exit(main())
