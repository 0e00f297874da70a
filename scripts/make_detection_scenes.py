"""Compose detection scenes from scikit-learn's bundled digits (pasted at several scales on
noisy 64 px canvases, with their boxes), train the tiny YOLOv8-style reference detector on
them on the CPU, and write teacher.onnx (input ``images``, output ``output0`` (N, 14, 80)) and
the held-out scenes.npz (--eval-data format, docs/detection.md).

    python scripts/make_detection_scenes.py --out examples/detection --seconds 180
    dafl-compress examples/detection/teacher.onnx --task detection \\
        --eval-data examples/detection/scenes.npz
"""

from __future__ import annotations

import argparse

import torch

from compress_toolbox.tasks.detection.scenes import SceneSpec
from compress_toolbox.tasks.detection.training import TrainOptions, make_benchmark


def main() -> None:
    """Parse the options, build the files, print where they are and the teacher's mAP."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/detection")
    parser.add_argument("--seconds", type=float, default=180.0, help="teacher training time")
    parser.add_argument("--size", type=int, default=64, help="canvas side, pixels (64-96)")
    parser.add_argument("--train-scenes", type=int, default=4000)
    parser.add_argument("--eval-scenes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    files = make_benchmark(args.out, TrainOptions(seconds=args.seconds, seed=args.seed),
                           SceneSpec(size=args.size), args.train_scenes, args.eval_scenes)
    print(f"teacher: {files.teacher} ({files.num_classes} classes), eval data: "
          f"{files.eval_data}, teacher mAP@0.5 on it: {files.teacher_map_50:.4f}")


if __name__ == "__main__":
    main()
