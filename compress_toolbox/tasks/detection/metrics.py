"""Mean average precision by pycocotools' COCOeval (the reference implementation; never by
hand): mAP@0.5, mAP@[.5:.95] and AP@0.5 per class, for detections against ground-truth boxes
given in memory. Class ``k`` is COCO category ``k + 1`` (COCO's ids start at 1)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from compress_toolbox.tasks.detection.decode import Detections


@dataclass(frozen=True)
class GroundTruth:
    """One image's annotated objects: boxes (G, 4) as x1, y1, x2, y2 pixels, labels (G,)."""

    boxes: torch.Tensor
    labels: torch.Tensor


@dataclass
class MapScores:
    """COCOeval's figures (None: no ground-truth object to measure against)."""

    map_50: float | None
    map_50_95: float | None
    per_class_ap_50: list[float | None] = field(default_factory=list)  # None: class absent


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    boxes = boxes.double()
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()


def _coco_ground_truth(truths: Sequence[GroundTruth], num_classes: int):
    from pycocotools.coco import COCO

    annotations = []
    for image_id, truth in enumerate(truths):
        for box, label in zip(_xywh(truth.boxes), truth.labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(label) + 1, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})  # fmt: skip
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i} for i in range(len(truths))],
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _results(detections: Sequence[Detections]) -> list[dict]:
    return [{"image_id": image_id, "category_id": int(label) + 1, "bbox": box,
             "score": float(score)}
            for image_id, found in enumerate(detections)
            for box, score, label in zip(_xywh(found.boxes), found.scores.tolist(),
                                         found.labels.tolist())]  # fmt: skip


def mean_average_precision(detections: Sequence[Detections], truths: Sequence[GroundTruth],
                           num_classes: int) -> MapScores:  # fmt: skip
    """COCOeval's bbox mAP of ``detections`` against ``truths`` (one of each per image)."""
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} images of detections, {len(truths)} of truths")
    if sum(len(t.labels) for t in truths) == 0:
        return MapScores(None, None, [None] * num_classes)
    ground = _coco_ground_truth(truths, num_classes)
    results = _results(detections)
    if not results:  # loadRes refuses an empty list: nothing found is an AP of 0
        present = {int(k) for t in truths for k in t.labels.tolist()}
        return MapScores(0.0, 0.0, [0.0 if k in present else None for k in range(num_classes)])
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(ground, ground.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    return MapScores(float(stats[1]), float(stats[0]), _per_class_ap_50(evaluation, num_classes))


def _per_class_ap_50(evaluation, num_classes: int) -> list[float | None]:
    """AP at IoU 0.5, all areas, 100 detections, per class (None where COCOeval has -1)."""
    precision = evaluation.eval["precision"][0, :, :, 0, -1]  # [recall, class]
    values: list[float | None] = []
    for k in range(num_classes):
        column = precision[:, k]
        values.append(None if np.all(column < 0) else float(column[column > -1].mean()))
    return values
