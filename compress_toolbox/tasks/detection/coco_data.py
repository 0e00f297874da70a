"""Detection evaluation data as users hold it: a COCO-style annotation JSON beside its images.

``--eval-data instances.json`` reads the file with pycocotools (``COCO``): its ``images`` (each
``file_name``, ``width``, ``height``), ``annotations`` (``image_id``, ``category_id``, ``bbox``
as x, y, width, height in pixels) and ``categories``. Image files are found relative to the
JSON's folder, or in its ``images/`` sub-folder. Categories, sorted by id, are the teacher's
classes 0, 1, ... in that order (COCO's 80 category ids 1..90 become ultralytics' 80 classes);
annotations marked ``iscrowd`` are left out. Every image is letterboxed to the teacher's input
size with its boxes (``data.letterbox``: aspect ratio kept, grey borders, as ultralytics
does), then treated as the ``.npz`` format's (``data.py``).

Refused with one line naming the file: a JSON that is not COCO, an annotation whose category
or image is not listed, more categories than the teacher has classes, a box outside its image
or empty, an image file missing, no annotation at all.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from compress_toolbox.tasks.detection.data import EDGE_TOLERANCE, letterbox
from compress_toolbox.tasks.evaldata import (
    EvalDataError,
    check_sample_count,
    fit_to_input,
    open_image,
    require_regular_file,
)

SECTIONS = ("images", "annotations", "categories")


def _read_json(path: Path) -> dict:
    require_regular_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvalDataError(f"{path}: not a JSON file ({error})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in SECTIONS):
        raise EvalDataError(f"{path}: not a COCO annotation file (a JSON object with lists "
                            f"{', '.join(SECTIONS)})")  # fmt: skip
    return data


def _index(path: Path, data: dict):
    """pycocotools' index of the file (its own messages held back)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as error:
        raise EvalDataError(f"{path}: a COCO entry lacks a field ({error})") from None
    return coco


def _classes(path: Path, coco, num_classes: int | None) -> dict[int, int]:
    """Category id -> class index, categories sorted by id."""
    ids = sorted(coco.getCatIds())
    if num_classes is not None and len(ids) > num_classes:
        raise EvalDataError(f"{path}: {len(ids)} categories but the teacher has {num_classes} "
                            "classes")  # fmt: skip
    return {cat: i for i, cat in enumerate(ids)}


def _image_file(path: Path, name: str) -> Path:
    for folder in (path.parent, path.parent / "images"):
        if (folder / name).is_file():
            return folder / name
    raise EvalDataError(f"{path}: image {name} not found beside it (nor in images/)")


def _objects(path: Path, coco, image: dict, classes: dict[int, int]) -> tuple[np.ndarray, list]:
    """(G, 4) x1, y1, x2, y2 boxes and labels of one image's annotations (crowds left out)."""
    boxes, labels = [], []
    width, height = image.get("width"), image.get("height")
    for note in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
        if note.get("iscrowd"):
            continue
        if note.get("category_id") not in classes:
            raise EvalDataError(f"{path}: annotation {note.get('id')} has category_id "
                                f"{note.get('category_id')}, not among the categories")  # fmt: skip
        x, y, w, h = (float(v) for v in note["bbox"])
        if (w <= 0 or h <= 0 or x < -EDGE_TOLERANCE or y < -EDGE_TOLERANCE
                or x + w > width + EDGE_TOLERANCE or y + h > height + EDGE_TOLERANCE):  # fmt: skip
            raise EvalDataError(f"{path}: annotation {note.get('id')} box {note['bbox']} is empty "
                                f"or outside its {width}x{height} image {image['file_name']}")
        boxes.append([x, y, x + w, y + h])
        labels.append(classes[note["category_id"]])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels


def _check_references(path: Path, data: dict) -> None:
    images = {image.get("id") for image in data["images"]}
    orphan = next((a for a in data["annotations"] if a.get("image_id") not in images), None)
    if orphan is not None:
        raise EvalDataError(f"{path}: annotation {orphan.get('id')} refers to image_id "
                            f"{orphan.get('image_id')}, not among the images")  # fmt: skip
    if not any(not a.get("iscrowd") for a in data["annotations"]):
        raise EvalDataError(f"{path}: no annotated object at all (zero annotations)")


def load_coco(path: Path, input_shape: tuple[int, ...], num_classes: int | None):
    """Images (N, C, H, W) in [0, 1] at the teacher's size (letterboxed), with per-image boxes
    (moved with them) and labels, from the COCO JSON at ``path``."""
    data = _read_json(path)
    _check_references(path, data)
    check_sample_count(len(data["images"]), path, input_shape)
    coco = _index(path, data)
    classes = _classes(path, coco, num_classes)
    mode = "L" if input_shape[0] == 1 else "RGB"
    images, boxes, labels = [], [], []
    for image in coco.loadImgs(sorted(coco.getImgIds())):
        file = _image_file(path, str(image["file_name"]))
        pixels = open_image(file, mode)
        size = (image.get("height") or pixels.shape[0], image.get("width") or pixels.shape[1])
        if tuple(size) != pixels.shape[:2]:
            raise EvalDataError(f"{file}: image is {pixels.shape[1]}x{pixels.shape[0]} but "
                                f"{path.name} says {size[1]}x{size[0]}")  # fmt: skip
        image = {**image, "height": size[0], "width": size[1]}
        found, kinds = _objects(path, coco, image, classes)
        x = torch.from_numpy(np.array(pixels, dtype=np.float32)).div(255)
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        x, (scale, offset) = letterbox(x[None], input_shape[1:])
        images.append(fit_to_input(x, input_shape, str(path))[0])
        boxes.append(found * scale + offset)
        labels.append(kinds)
    return torch.stack(images), boxes, labels


def save_detection_coco(path: str | Path, images: np.ndarray, boxes: list[np.ndarray],
                        labels: list[np.ndarray]) -> Path:  # fmt: skip
    """Write images (N, H, W) or (N, C, H, W), uint8 or floats in [0, 1], as PNG files beside
    a COCO annotation JSON at ``path``, with per-image boxes (G, 4) as x1, y1, x2, y2 pixels
    and labels (G,) in [0, K) (category ``k + 1``)."""
    from PIL import Image

    path = Path(path)
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(images)
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)
    if pixels.ndim == 4:
        pixels = pixels.transpose(0, 2, 3, 1).squeeze(-1) if pixels.shape[1] == 1 else \
            pixels.transpose(0, 2, 3, 1)  # fmt: skip
    entries, notes = [], []
    for i, (image, found, kinds) in enumerate(zip(pixels, boxes, labels), start=1):
        name = f"images/{i:06d}.png"
        Image.fromarray(image).save(path.parent / name)
        entries.append({"id": i, "file_name": name, "height": image.shape[0],
                        "width": image.shape[1]})  # fmt: skip
        for (x1, y1, x2, y2), k in zip(np.asarray(found, float).reshape(-1, 4), kinds):
            notes.append({"id": len(notes) + 1, "image_id": i, "category_id": int(k) + 1,
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                          "iscrowd": 0})  # fmt: skip
    count = 1 + max((int(k) for kinds in labels for k in kinds), default=0)
    categories = [{"id": k + 1, "name": str(k)} for k in range(count)]
    path.write_text(json.dumps({"images": entries, "annotations": notes,
                                "categories": categories}), encoding="utf-8")  # fmt: skip
    return path
