"""The detection benchmark's torchvision architectures (issue 26): a small torchvision FCOS
(``--arch fcos``, benchmarks/teachers/fcos_model.py) or SSD (``--arch ssd``, ssd_model.py:
softmax class logits with a background column), trained (seeded) with torchvision's own losses
on the same digit scenes as bench_detection.py, shipped as a Python checkpoint (a state_dict)
with its class, then compressed end to end through the same ``compress`` the CLI runs:

    dafl-compress teacher.pt --model-class benchmarks/teachers/fcos_model.py:RawFCOS \\
        --input-shape 3,64,64 --task detection --eval-data scenes.npz \\
        --decode benchmarks/teachers/fcos_model.py:decode_outputs
    (SSD: ssd_model.py:RawSSD, ssd_model.py:decode_outputs and --head ssd)

Their boxes are encoded against anchors the file does not hold; ``--decode`` hands the tool
the teacher's own torchvision ``postprocess_detections`` (anchors, NMS), so its report and
verdict are mAP on the held-out scenes. This script then checks it the way the user would: it
runs ``student.onnx`` in onnxruntime, decodes the raw outputs with the same torchvision code
and scores teacher and student by COCOeval against the held-out scenes' boxes: the drop-in
promise, measured.

    python benchmarks/bench_detection_torchvision.py --arch fcos --budget 600 \\
        --teacher-seconds 180 --seed 0
    python benchmarks/bench_detection_torchvision.py --arch fcos --data D --iters 500 \\
        --set dafl-det.div=1                                       # a screen, teacher reused
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "teachers"))


@dataclass(frozen=True)
class Arch:
    """One torchvision teacher: its file in benchmarks/teachers, raw-head class, the --head it
    needs and the label of class 0 in torchvision's training targets (1 where 0 is the
    background)."""

    module: str
    raw_class: str
    head: str | None = None
    first_label: int = 0

    def spec(self, name: str) -> str:
        """``FILE.py:NAME`` of ``name`` in this teacher's file (--model-class, --decode)."""
        return f"{HERE / 'teachers' / self.module}.py:{name}"


ARCHS = {"fcos": Arch("fcos_model", "RawFCOS"),
         "ssd": Arch("ssd_model", "RawSSD", head="ssd", first_label=1)}  # fmt: skip


def train_detector(arch: Arch, scenes, num_classes: int, seconds: float, seed: int,
                   batch_size: int = 32):  # fmt: skip
    """``arch``'s raw-head model whose detector was trained on ``scenes`` with torchvision's
    own losses for ``seconds`` (eval mode when returned)."""
    torch.manual_seed(seed)
    model = getattr(importlib.import_module(arch.module), arch.raw_class)(num_classes)
    detector = model.detector.train()
    images = torch.from_numpy(scenes.images).float() / 255.0
    targets = [{"boxes": torch.from_numpy(b).float(),
                "labels": torch.from_numpy(k).long() + arch.first_label}
               for b, k in zip(scenes.boxes, scenes.labels)]  # fmt: skip
    optimiser = torch.optim.AdamW(detector.parameters(), lr=3e-3, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        batch = rng.choice(len(images), size=batch_size, replace=False)
        losses = detector(list(images[batch]), [targets[i] for i in batch])
        loss = sum(losses.values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        steps += 1
    print(f"teacher: {steps} steps in {seconds:.0f} s, last loss {loss.item():.3f}")
    return model.eval()


def decoded_map(arch: Arch, model, outputs: tuple[torch.Tensor, ...], scenes,
                num_classes: int):  # fmt: skip
    """COCOeval mAP@0.5 and @[.5:.95] of raw ``outputs`` decoded by ``model``'s detector."""
    decode = importlib.import_module(arch.module).decode
    from compress_toolbox.tasks.detection.decode import Detections
    from compress_toolbox.tasks.detection.metrics import GroundTruth, mean_average_precision

    with torch.no_grad():
        found = decode(model.detector, *outputs)
    detections = [Detections(f["boxes"], f["scores"], f["labels"]) for f in found]
    truths = [GroundTruth(torch.from_numpy(b), torch.from_numpy(k))
              for b, k in zip(scenes.boxes, scenes.labels)]  # fmt: skip
    return mean_average_precision(detections, truths, num_classes)


def onnx_outputs(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The raw outputs of ``path`` in onnxruntime, in the file's output order."""
    from compress_toolbox.export.writer import onnx_session

    session = onnx_session(path)
    name = session.get_inputs()[0].name
    return tuple(torch.from_numpy(o) for o in session.run(None, {name: images.numpy()}))


def teacher_files(args: argparse.Namespace, arch: Arch):
    """The held-out scenes, their number of classes and the teacher's checkpoint (its folder
    also holds scenes.npz): trained for --teacher-seconds, or with --data the one a previous
    run of the same architecture and seed trained there (training by time does not repeat)."""
    from bench_detection import keep_teacher, kept_teacher

    from compress_toolbox.tasks.detection.data import save_detection_npz
    from compress_toolbox.tasks.detection.scenes import SceneSpec
    from compress_toolbox.tasks.detection.training import benchmark_scenes

    data = Path(args.data) if args.data else Path(args.out) / "data"
    data.mkdir(parents=True, exist_ok=True)
    made = {"arch": args.arch, "seed": args.seed, "teacher_seconds": args.teacher_seconds}
    teacher_file = data / "teacher.pt"
    kept = kept_teacher(data, made, (teacher_file.name, "scenes.npz")) if args.data else None
    if kept:
        if "num_classes" not in kept:
            raise SystemExit(f"{data / 'benchmark.json'} is older than its number of classes: "
                             "delete it to build the teacher again")  # fmt: skip
        return read_scenes(data / "scenes.npz"), kept["num_classes"], teacher_file
    train, held_out, num_classes = benchmark_scenes(SceneSpec(size=64), args.seed)
    teacher = train_detector(arch, train, num_classes, args.teacher_seconds, args.seed)
    torch.save(teacher.state_dict(), teacher_file)
    save_detection_npz(data / "scenes.npz", held_out.images, held_out.boxes, held_out.labels)
    keep_teacher(data, made, num_classes=num_classes)
    return held_out, num_classes, teacher_file


def read_scenes(path: Path):
    """The scenes ``save_detection_npz`` wrote to ``path``, as composed (``Scenes``)."""
    from compress_toolbox.tasks.detection.data import per_image
    from compress_toolbox.tasks.detection.scenes import Scenes

    with np.load(path) as arrays:
        counts = arrays["counts"]
        return Scenes(arrays["images"], per_image(arrays["boxes"], counts),
                      per_image(arrays["labels"], counts))  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    """Build the teacher and scenes, compress, decode both, and return the figures."""
    from bench_suite import parse_sets

    from compress_toolbox import CompressConfig, compress
    from compress_toolbox.distillation.presets import PRESETS
    from compress_toolbox.errors import DaflError

    changes = parse_sets(args.set)
    preset = PRESETS["fast"].with_options(**changes) if changes else "fast"
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    arch = ARCHS[args.arch]
    held_out, num_classes, teacher_file = teacher_files(args, arch)
    teacher = getattr(importlib.import_module(arch.module), arch.raw_class)(num_classes)
    teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
    teacher.eval()
    x = torch.from_numpy(held_out.images).float() / 255.0
    with torch.no_grad():
        teacher_scores = decoded_map(arch, teacher, teacher(x), held_out, num_classes)
    budget = {"iters": args.iters} if args.iters else {"time_budget": args.budget}
    config = CompressConfig.from_options(task="detection",
                                         eval_data=str(teacher_file.with_name("scenes.npz")),
                                         model_class=arch.spec(arch.raw_class),
                                         decode=arch.spec("decode_outputs"),
                                         head=args.head or arch.head,
                                         input_shape=(3, 64, 64),
                                         **budget, threads=args.threads,
                                         seed=args.seed, out=str(out / "run"), force=True,
                                         progress=False, method=args.method,
                                         preset=preset)  # fmt: skip
    start = time.perf_counter()
    try:
        compress(teacher_file, config)
    except DaflError as error:  # a failed student still leaves its report
        print(f"run failed: {str(error)[:300]}")
    if not (out / "run" / "student.onnx").is_file():
        raise SystemExit("no student.onnx written")
    report = json.loads((out / "run" / "report.json").read_text())
    student_scores = decoded_map(arch, teacher, onnx_outputs(out / "run" / "student.onnx", x),
                                 held_out, num_classes)  # fmt: skip
    t, s = teacher_scores, student_scores
    return {"teacher_map_50": t.map_50, "student_map_50": s.map_50,
            "map_50_ratio": s.map_50 / t.map_50 if t.map_50 else None,
            "teacher_map_50_95": t.map_50_95, "student_map_50_95": s.map_50_95,
            "params_ratio": report["student"]["params"] / report["teacher"]["params"],
            "tool_teacher_map_50": report["teacher"].get("map_50"),
            "tool_student_map_50": report["student"].get("map_50"),
            "fidelity_map_50": report["detection"]["fidelity_map_50"],
            "status": report["status"], "iterations": report["iterations"],
            "method": report["method"], "compress_s": round(time.perf_counter() - start, 1),
            "budget_s": None if args.iters else args.budget, "iters": args.iters, "set": changes,
            "seed": args.seed, "arch": args.arch}  # fmt: skip


def main() -> None:
    """Parse the options, run once, print the figures (and write them as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="fcos")
    parser.add_argument("--head", help="--head for the tool (default: the architecture's)")
    parser.add_argument("--budget", type=float, default=300.0, help="distillation seconds")
    parser.add_argument("--teacher-seconds", type=float, default=180.0)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default /tmp/bench_detection_ARCH")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="fast-preset fields to change, and loss weights as "
                        "METHOD.WEIGHT (e.g. bn-prior-det.bn=0.5)")  # fmt: skip
    parser.add_argument("--data", help="the teacher's folder, reused when a run of the same "
                        "architecture and seed trained it there (default: a new one in --out)")
    parser.add_argument("--iters", type=int, help="iterations instead of --budget (deterministic "
                        "at one thread, for screens at equal iterations)")
    args = parser.parse_args()
    args.out = args.out or f"/tmp/bench_detection_{args.arch}"
    from bench_detection import print_figures

    print_figures(run(args), Path(args.out))


if __name__ == "__main__":
    main()
