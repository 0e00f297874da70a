"""Training the tiny reference detector on composed scenes (the benchmark's teacher; never used
by the distillation itself, which sees no data). Anchor-free assignment as FCOS does it: an
object is learnt at the locations near its centre on the level that fits its size."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from compress_toolbox.tasks.detection.data import save_detection_npz
from compress_toolbox.tasks.detection.decode import decode
from compress_toolbox.tasks.detection.heads import HeadLayout, cxcywh_to_xyxy
from compress_toolbox.tasks.detection.metrics import GroundTruth, mean_average_precision
from compress_toolbox.tasks.detection.scenes import Scenes, SceneSpec, compose_scenes, digit_objects
from compress_toolbox.tasks.detection.tiny_model import STRIDES, RawLevels, TinyYolo

LEVEL_SPLIT = 20.0  # objects whose longest side is below this are learnt at stride 8
CENTRE_RADIUS = 1.5  # positives lie within this many strides of the object's centre


@dataclass(frozen=True)
class TrainOptions:
    """How long and how the reference detector is trained."""

    seconds: float = 180.0
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


def _anchors(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, 2) location centres and (A,) their strides, in the model's output order."""
    points, strides = [], []
    for stride in STRIDES:
        side = image_size // stride
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        points.append((torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * stride)
        strides.append(torch.full((side * side,), float(stride)))
    return torch.cat(points), torch.cat(strides)


def assign(boxes: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """(A,) index of the object each location learns, -1 for background."""
    target = torch.full((len(points),), -1, dtype=torch.long)
    best_area = torch.full((len(points),), float("inf"))
    for index, box in enumerate(boxes):
        size = float((box[2:] - box[:2]).max())
        level = STRIDES[0] if size < LEVEL_SPLIT else STRIDES[1]
        centre = (box[:2] + box[2:]) / 2
        offset = (points - centre).abs().max(1).values
        near = (offset < CENTRE_RADIUS * strides) & (strides == level)
        inside = (points >= box[:2]).all(1) & (points <= box[2:]).all(1)
        chosen = near & inside
        if not chosen.any():
            distance = (points - centre).norm(dim=1) + 1e6 * (strides != level)
            chosen = torch.zeros_like(near)
            chosen[distance.argmin()] = True
        area = float((box[2] - box[0]) * (box[3] - box[1]))
        chosen &= area < best_area
        target[chosen], best_area[chosen] = index, area
    return target


def _targets(scenes: Scenes, indices, points, strides, num_classes):
    classes, boxes, positive = [], [], []
    for i in indices:
        gt = torch.from_numpy(scenes.boxes[i])
        owner = assign(gt, points, strides)
        onehot = torch.zeros(len(points), num_classes)
        pos = owner >= 0
        onehot[pos, torch.from_numpy(scenes.labels[i])[owner[pos]]] = 1.0
        box = torch.zeros(len(points), 4)
        box[pos] = gt[owner[pos]]
        classes.append(onehot), boxes.append(box), positive.append(pos)
    return torch.stack(classes), torch.stack(boxes), torch.stack(positive)


def detector_loss(out, classes, boxes, positive, layout: HeadLayout) -> torch.Tensor:
    """BCE on every location's class scores, GIoU + L1 on the positive locations' boxes."""
    scores = layout.class_scores(out).clamp(1e-6, 1 - 1e-6)
    n_pos = positive.sum().clamp_min(1)
    cls = F.binary_cross_entropy(scores, classes, reduction="sum") / n_pos
    pred = cxcywh_to_xyxy(layout.boxes(out))[positive]
    target = boxes[positive]
    if len(target) == 0:
        return cls
    giou = generalized_box_iou_loss(pred, target, reduction="sum") / n_pos
    l1 = (pred - target).abs().sum() / n_pos / 16.0
    return cls + 2.0 * giou + l1


def train_detector(scenes: Scenes, num_classes: int, options: TrainOptions = TrainOptions(),
                   width: int = 16, yolov5: bool = False) -> TinyYolo:  # fmt: skip
    """A TinyYolo (of the YOLOv5 layout, with an objectness, with ``yolov5``) trained on
    ``scenes`` for ``options.seconds`` (eval mode when returned)."""
    torch.manual_seed(options.seed)
    size, channels = scenes.images.shape[-1], scenes.images.shape[1]
    model = TinyYolo(num_classes, channels, width, size, yolov5=yolov5)
    layout = HeadLayout("yolov5" if yolov5 else "yolov8", num_classes)
    points, strides = _anchors(size)
    images = torch.from_numpy(scenes.images).float() / 255.0
    optimiser = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=1e-4)
    rng = np.random.default_rng(options.seed)
    start = time.perf_counter()
    model.train()
    while time.perf_counter() - start < options.seconds:
        batch = rng.choice(len(images), size=options.batch_size, replace=False)
        classes, boxes, positive = _targets(scenes, batch, points, strides, num_classes)
        loss = detector_loss(model(images[batch]), classes, boxes, positive, layout)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def export_detector(model: torch.nn.Module, path: str | Path, image_size: int,
                    channels: int = 3,
                    outputs: tuple[str, ...] = ("output0",)) -> Path:  # fmt: skip
    """``model`` as a user ships it: torch.onnx.export (opset 17), input ``images`` and output
    ``output0`` (or ``outputs``, one per tensor the model returns) with a dynamic batch, as
    ultralytics names them."""
    example = torch.rand(2, channels, image_size, image_size)
    axes = {name: {0: "batch"} for name in ("images", *outputs)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=list(outputs),
                          dynamic_axes=axes)  # fmt: skip
    return Path(path)


@dataclass(frozen=True)
class BenchmarkFiles:
    """What ``make_benchmark`` wrote: the teacher, its eval scenes, its mAP on them."""

    teacher: Path
    eval_data: Path
    teacher_map_50: float | None
    num_classes: int


def benchmark_scenes(spec: SceneSpec, seed: int, train_scenes: int = 4000,
                     eval_scenes: int = 300) -> tuple[Scenes, Scenes, int]:  # fmt: skip
    """(training scenes, held-out eval scenes, number of classes) of the detection benchmarks,
    seeded: the eval scenes are composed of digits the training scenes never show."""
    objects, labels = digit_objects()
    cut = int(len(objects) * 0.8)
    train = compose_scenes(objects[:cut], labels[:cut], train_scenes, spec, seed=seed)
    held_out = compose_scenes(objects[cut:], labels[cut:], eval_scenes, spec, seed=seed + 1)
    return train, held_out, int(labels.max()) + 1


def make_benchmark(out_dir: str | Path, options: TrainOptions = TrainOptions(),
                   spec: SceneSpec = SceneSpec(), train_scenes: int = 4000,
                   eval_scenes: int = 300, width: int = 16,
                   head: str = "yolov8") -> BenchmarkFiles:  # fmt: skip
    """Compose digit scenes (seeded), train a TinyYolo on them, export it as teacher.onnx and
    the held-out scenes as scenes.npz (the --eval-data format) into ``out_dir``. ``head``:
    ``yolov8`` or ``yolov5``, the layout it is trained with and shipped as (decoded), or
    ``levels``, a YOLOv5-layout one shipped as its raw levels (``RawLevels``: outputs p3,
    p4)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held_out, num_classes = benchmark_scenes(spec, options.seed, train_scenes, eval_scenes)
    model = train_detector(train, num_classes, options, width, yolov5=head != "yolov8")
    levels = head == "levels"
    shipped, names = (RawLevels(model), ("p3", "p4")) if levels else (model, ("output0",))
    teacher = export_detector(shipped, out_dir / "teacher.onnx", spec.size, spec.channels,
                              outputs=names)  # fmt: skip
    eval_data = save_detection_npz(out_dir / "scenes.npz", held_out.images, held_out.boxes,
                                   held_out.labels)  # fmt: skip
    x = torch.from_numpy(held_out.images).float() / 255.0
    with torch.no_grad():
        found = decode(model(x), HeadLayout("yolov8" if head == "yolov8" else "yolov5",
                                            num_classes))  # fmt: skip
    truths = [GroundTruth(torch.from_numpy(b), torch.from_numpy(k))
              for b, k in zip(held_out.boxes, held_out.labels)]  # fmt: skip
    score = mean_average_precision(found, truths, num_classes).map_50
    return BenchmarkFiles(teacher, eval_data, score, num_classes)
