"""Train and export the segmentation benchmark teachers (CPU, Fashion-MNIST canvases).

    python benchmarks/teachers/make_segmentation.py [--only unet-seg] [--out DIR]

Writes DIR (default benchmarks/teachers/out/segmentation/, not committed): ``seg_eval.npz``
(1,000 canvases from the 10k test garments, uint8 x (N, 64, 64) and masks y, as a user would
pass them), and for each teacher its torch default ONNX export (``NAME.onnx``, BatchNorm folded)
and ``NAME.pt2`` (torch.export, BatchNorm kept), plus ``segmentation.json`` with MACs and the
teacher's mean IoU on seg_eval.npz. Teachers take [0, 1] pixels (no --mean/--std):

- ``unet-seg``: the zoo's U-Net at widths 8-16-32-64 (``unet_tiny``), 1 channel, 11 classes;
- ``lraspp-seg``: torchvision's LR-ASPP on a MobileNetV3-Large (``lraspp_mobilenet_v3_large``).

Each is trained for a fixed number of steps (Adam, batch 16, cross-entropy; ~7 minutes each on
one core) on canvases from the 60k training garments (benchmarks/make_segmentation_data.py).
Already trained teachers are kept; ``--only NAME`` trains one (two can run side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from make_segmentation_data import NUM_CLASSES, fashion_garments, make_canvases  # noqa: E402

from compress_toolbox.export.writer import export_onnx, export_pt2  # noqa: E402
from compress_toolbox.load.analysis import analyse  # noqa: E402
from compress_toolbox.tasks.segmetrics import score_masks  # noqa: E402
from model_zoo import get_model  # noqa: E402

INPUT_SHAPE = (1, 64, 64)
TEACHERS = {"unet-seg": "unet_tiny", "lraspp-seg": "lraspp_mobilenet_v3_large"}
STEPS = {"unet-seg": 2500, "lraspp-seg": 1500}


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Adam + cross-entropy (background weighted 0.3: it covers 84% of the pixels) on random
    batches of 16, cosine learning rate; returns the seconds taken."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    weight = torch.ones(NUM_CLASSES)
    weight[0] = 0.3
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        index = torch.randint(len(x), (16,))
        loss = F.cross_entropy(model(x[index]), y[index], weight=weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(f"  step {step + 1} loss {float(loss):.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)  # fmt: skip
    return time.perf_counter() - start


@torch.no_grad()
def mean_iou(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return score_masks(predictions, y, NUM_CLASSES).mean_iou


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "out" / "segmentation")
    parser.add_argument("--only", choices=tuple(TEACHERS), nargs="+", default=list(TEACHERS))
    parser.add_argument("--train-canvases", type=int, default=12000)
    parser.add_argument("--threads", type=int, default=1,
                        help="1: measured 4-14x faster than 2 on a shared 2-core CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    eval_path = args.out / "seg_eval.npz"
    if not eval_path.exists():
        x_eval, y_eval = make_canvases(*fashion_garments("test"), 1000, seed=1)
        # written aside and renamed: a second --only run started alongside must never read a
        # half-written file
        partial = eval_path.with_name(f"{eval_path.stem}.{os.getpid()}.partial.npz")
        try:
            np.savez_compressed(partial, x=x_eval, y=y_eval)
            os.replace(partial, eval_path)
        finally:
            partial.unlink(missing_ok=True)
    with np.load(eval_path) as data:
        x_eval = torch.from_numpy(data["x"]).float()[:, None] / 255
        y_eval = torch.from_numpy(data["y"]).long()
    manifest_path = args.out / "segmentation.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    x_train = y_train = None
    for name in args.only:
        zoo_name = TEACHERS[name]
        if name in manifest and (args.out / f"{name}.onnx").exists():
            print(f"{name}: kept ({manifest[name]['teacher_miou']:.4f} mIoU)")
            continue
        if x_train is None:
            print(f"building {args.train_canvases} training canvases ...", flush=True)
            x_np, y_np = make_canvases(*fashion_garments("train"), args.train_canvases, seed=0)
            x_train = torch.from_numpy(x_np).float()[:, None] / 255
            y_train = torch.from_numpy(y_np).long()
        torch.manual_seed(0)
        model = get_model(zoo_name, num_classes=NUM_CLASSES, in_channels=1, input_size=(64, 64))
        print(f"{name}: training {zoo_name} for {STEPS[name]} steps", flush=True)
        seconds = train(model, x_train, y_train, STEPS[name])
        model.eval()
        score = mean_iou(model, x_eval, y_eval)
        export_onnx(model, INPUT_SHAPE, args.out / f"{name}.onnx", what=name)
        export_pt2(model, INPUT_SHAPE, args.out / f"{name}.pt2")
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        manifest[name] = {"zoo": zoo_name, "steps": STEPS[name], "seconds": round(seconds),
                          "macs": analyse(model, INPUT_SHAPE).macs, "teacher_miou": score,
                          "eval": eval_path.name}  # fmt: skip
        partial = manifest_path.with_name(f"{manifest_path.stem}.{os.getpid()}.partial.json")
        partial.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(partial, manifest_path)  # a reader never sees it half-written
        print(f"{name}: {STEPS[name]} steps in {seconds:.0f} s, teacher mIoU {score:.4f}",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
