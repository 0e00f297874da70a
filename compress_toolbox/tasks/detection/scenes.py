"""Synthetic detection scenes: small object images (digits, clothes) pasted at several scales
and colours on noisy canvases, with their boxes. The benchmark's and the tests' data; no
download (scikit-learn's bundled digits are enough)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

INK = 0.15  # pixels above this are part of an object (for its tight box)
MAX_OVERLAP = 0.2  # IoU above which a new object is placed elsewhere


@dataclass(frozen=True)
class SceneSpec:
    """How scenes are composed: canvas size and channels, objects per scene, object sizes."""

    size: int = 64
    channels: int = 3
    objects: tuple[int, int] = (1, 3)  # at least, at most per scene
    scales: tuple[int, int] = (12, 30)  # longest side of a pasted object, pixels
    noise: float = 0.08


@dataclass
class Scenes:
    """Composed scenes: uint8 images (N, C, S, S), per image boxes (G, 4) xyxy and labels."""

    images: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]


def digit_objects() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as objects in [0, 1] and their labels (10 classes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _tight(obj: np.ndarray) -> np.ndarray:
    rows, cols = np.where(obj > INK)
    if len(rows) == 0:
        return obj
    return obj[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _resized(obj: np.ndarray, longest: int) -> np.ndarray:
    h, w = obj.shape
    factor = longest / max(h, w)
    size = (max(2, round(h * factor)), max(2, round(w * factor)))
    resized = F.interpolate(torch.from_numpy(obj)[None, None], size=size, mode="bilinear",
                            align_corners=False)  # fmt: skip
    return resized[0, 0].clamp(0, 1).numpy()


def _iou(box: np.ndarray, others: list[np.ndarray]) -> float:
    if not others:
        return 0.0
    o = np.stack(others)
    x1, y1 = np.maximum(box[0], o[:, 0]), np.maximum(box[1], o[:, 1])
    x2, y2 = np.minimum(box[2], o[:, 2]), np.minimum(box[3], o[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return float((inter / (area(box) + area(o) - inter)).max())


def _canvas(spec: SceneSpec, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(0.0, 0.35, size=(spec.channels, 1, 1))
    noise = rng.normal(0, spec.noise, size=(spec.channels, spec.size, spec.size))
    return (base + noise).astype(np.float32)


def _one_scene(objects, labels, spec: SceneSpec, rng) -> tuple[np.ndarray, list, list]:
    canvas, boxes, kept = _canvas(spec, rng), [], []
    for _ in range(rng.integers(spec.objects[0], spec.objects[1] + 1)):
        index = int(rng.integers(len(objects)))
        patch = _resized(_tight(objects[index]), int(rng.integers(*spec.scales, endpoint=True)))
        h, w = patch.shape
        for _try in range(10):
            y, x = int(rng.integers(0, spec.size - h + 1)), int(rng.integers(0, spec.size - w + 1))
            box = np.array([x, y, x + w, y + h], dtype=np.float32)
            if _iou(box, boxes) <= MAX_OVERLAP:
                break
        else:
            continue
        colour = rng.uniform(0.6, 1.0, size=(spec.channels, 1, 1)).astype(np.float32)
        region = canvas[:, y : y + h, x : x + w]
        canvas[:, y : y + h, x : x + w] = np.maximum(region, patch[None] * colour)
        boxes.append(box)
        kept.append(int(labels[index]))
    return canvas, boxes, kept


def compose_scenes(objects: np.ndarray, labels: np.ndarray, count: int,
                   spec: SceneSpec = SceneSpec(), seed: int = 0) -> Scenes:  # fmt: skip
    """``count`` scenes of ``objects`` (M, h, w) in [0, 1] with class ``labels`` (M,)."""
    rng = np.random.default_rng(seed)
    images, all_boxes, all_labels = [], [], []
    for _ in range(count):
        canvas, boxes, kept = _one_scene(objects, labels, spec, rng)
        images.append(np.clip(canvas * 255, 0, 255).astype(np.uint8))
        all_boxes.append(np.asarray(boxes, np.float32).reshape(-1, 4))
        all_labels.append(np.asarray(kept, np.int64))
    return Scenes(np.stack(images), all_boxes, all_labels)
