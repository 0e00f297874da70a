"""Detection evaluation data: an ``.npz`` of images with their boxes and labels, or a COCO
annotation JSON beside its images (``coco_data.py``).

The ``.npz`` format (all arrays, ``allow_pickle=False``):

- ``images``: (N, H, W) or (N, C, H, W), uint8 pixels or floats in [0, 1];
- ``boxes``: (M, 4) float, every object of every image, image after image, as x1, y1, x2, y2
  in pixels of its image;
- ``labels``: (M,) integer classes in [0, K);
- ``counts``: (N,) integers, how many of the M objects each image has (they sum to M).

Images of another size than the teacher's input are letterboxed as ultralytics feeds its
detectors: scaled to fit with their aspect ratio kept, centred, the rest grey (114), their
boxes moved with them (``letterbox``); then mapped into the teacher's input domain as for the
other tasks. A file with a box outside its image or empty, an unknown label,
inconsistent counts or no annotation at all is refused with one line naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compress_toolbox.domain import InputDomain
from compress_toolbox.tasks.detection.metrics import GroundTruth
from compress_toolbox.tasks.evaldata import (
    MAX_EVAL_BYTES,
    EvalData,
    EvalDataError,
    check_sample_count,
    fit_to_input,
    require_regular_file,
    to_float_or_fail,
)

KEYS = ("images", "boxes", "labels", "counts")
EDGE_TOLERANCE = 0.5  # pixels a box may reach past the image's edge (rounding)
LETTERBOX_GREY = 114 / 255  # ultralytics' padding, in [0, 1]
BoxMap = tuple[np.ndarray, np.ndarray]  # (scale, offset): boxes * scale + offset


def letterbox(x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, BoxMap]:
    """(N, C, h, w) images in [0, 1] scaled by r = min(H / h, W / w) to fit ``size`` (H, W)
    with their aspect ratio kept and centred on a grey canvas, as ultralytics' LetterBox does;
    and the map of their x1, y1, x2, y2 boxes: (scale, offset), boxes * scale + offset (the
    scale per axis of the rounded size, so that boxes fill the image exactly as it was drawn).
    Images of ``size`` come back as they are."""
    height, width = size
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x, (np.ones(4), np.zeros(4))
    r = min(height / h, width / w)
    new_h, new_w = max(1, round(h * r)), max(1, round(w * r))
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas = x.new_full((*x.shape[:2], height, width), LETTERBOX_GREY)
    canvas[..., top:top + new_h, left:left + new_w] = torch.nn.functional.interpolate(
        x, size=(new_h, new_w), mode="bilinear", align_corners=False)  # fmt: skip
    scale = np.array([new_w / w, new_h / h] * 2)
    return canvas, (scale, np.array([left, top, left, top], dtype=np.float64))


@dataclass
class DetectionEvalData(EvalData):
    """Images shaped for the teacher (``x``), their index (``y``) and their objects."""

    truths: list[GroundTruth] = field(default_factory=list)

    def subset(self, n: int) -> DetectionEvalData:
        """A fixed random subset of at most ``n`` images with their objects."""
        if len(self) <= n:
            return self
        keep = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:n]
        return DetectionEvalData(self.x[keep], torch.arange(n), f"{self.source} ({n} of "
                                 f"{len(self)})", [self.truths[int(i)] for i in keep])  # fmt: skip


def save_detection_npz(path: str | Path, images: np.ndarray, boxes: list[np.ndarray],
                       labels: list[np.ndarray]) -> Path:  # fmt: skip
    """Write images with per-image boxes (G, 4) and labels (G,) in the format above."""
    counts = np.asarray([len(b) for b in boxes], dtype=np.int64)
    flat_boxes = np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b in boxes])
    flat_labels = np.concatenate([np.asarray(k, np.int64).reshape(-1) for k in labels])
    np.savez_compressed(path, images=images, boxes=flat_boxes, labels=flat_labels, counts=counts)
    return Path(path)


def per_image(values: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """The objects' ``values`` (boxes or labels, all images' in order) cut into one array per
    image, ``counts[i]`` for image i: the layout ``save_detection_npz`` writes."""
    return np.split(values, np.cumsum(counts)[:-1])


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    require_regular_file(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in KEYS if key not in archive.files]
            if missing:
                raise EvalDataError(f"{path}: a detection .npz needs arrays {', '.join(KEYS)}; "
                                    f"missing {', '.join(missing)}")  # fmt: skip
            for key in KEYS:
                if archive.zip.getinfo(f"{key}.npy").file_size > MAX_EVAL_BYTES:
                    raise EvalDataError(f"{path}: array '{key}' is larger than "
                                        f"{MAX_EVAL_BYTES / 2**30:.0f} GiB")  # fmt: skip
            return {key: archive[key] for key in KEYS}
    except EvalDataError:
        raise
    except Exception as error:  # noqa: BLE001 - numpy raises many types for bad files
        raise EvalDataError(f"{path}: cannot read .npz ({error})") from None


def _check_counts(path: Path, arrays: dict[str, np.ndarray], images: int) -> np.ndarray:
    counts, boxes, labels = arrays["counts"], arrays["boxes"], arrays["labels"]
    if counts.ndim != 1 or len(counts) != images or not np.issubdtype(counts.dtype, np.integer):
        raise EvalDataError(f"{path}: counts must be {images} integers, one per image; got "
                            f"{counts.dtype} {counts.shape}")  # fmt: skip
    if (counts < 0).any() or int(counts.sum()) != len(boxes) or len(labels) != len(boxes):
        raise EvalDataError(f"{path}: counts sum to {int(counts.sum())} but there are "
                            f"{len(boxes)} boxes and {len(labels)} labels")  # fmt: skip
    if len(boxes) == 0:
        raise EvalDataError(f"{path}: no annotated object at all (zero annotations)")
    return counts


def _check_objects(path: Path, boxes: np.ndarray, labels: np.ndarray, image_of: np.ndarray,
                   size: tuple[int, int], num_classes: int | None) -> None:  # fmt: skip
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all():
        raise EvalDataError(f"{path}: boxes must be finite (M, 4) x1, y1, x2, y2; got "
                            f"{boxes.shape}")  # fmt: skip
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise EvalDataError(f"{path}: labels must be (M,) integers; got {labels.dtype}")
    height, width = size
    x1, y1, x2, y2 = boxes.T
    outside = ((x1 < -EDGE_TOLERANCE) | (y1 < -EDGE_TOLERANCE) | (x2 > width + EDGE_TOLERANCE)
               | (y2 > height + EDGE_TOLERANCE) | (x2 <= x1) | (y2 <= y1))  # fmt: skip
    if outside.any():
        i = int(np.argmax(outside))
        raise EvalDataError(f"{path}: box {i} {boxes[i].tolist()} of image {int(image_of[i])} "
                            f"is empty or outside its {width}x{height} image")  # fmt: skip
    bad = (labels < 0) | (labels >= (num_classes or 2**31))
    if bad.any():
        i = int(np.argmax(bad))
        raise EvalDataError(f"{path}: label {int(labels[i])} of box {i} is not one of the "
                            f"teacher's {num_classes} classes (0..{(num_classes or 1) - 1})")


def load_detection_data(path: Path, input_shape: tuple[int, ...], domain: InputDomain,
                        num_classes: int | None) -> DetectionEvalData:  # fmt: skip
    """Images, boxes and labels of a detection .npz (see above) or COCO JSON (coco_data.py),
    shaped for the teacher."""
    if path.suffix.lower() == ".json" and not path.is_dir():
        from compress_toolbox.tasks.detection.coco_data import load_coco

        x, boxes, labels = load_coco(path, input_shape, num_classes)
        return _as_eval_data(x, boxes, labels, domain, path)
    if path.suffix.lower() != ".npz" or path.is_dir():
        raise EvalDataError(f"{path}: detection eval data must be an .npz with arrays "
                            f"{', '.join(KEYS)} or a COCO annotation .json")  # fmt: skip
    arrays = _read_arrays(path)
    images = arrays["images"]
    if images.ndim not in (3, 4):
        raise EvalDataError(f"{path}: images have shape {images.shape}; expected (N, H, W) or "
                            "(N, C, H, W)")  # fmt: skip
    check_sample_count(len(images), path, input_shape)
    counts = _check_counts(path, arrays, len(images))
    image_of = np.repeat(np.arange(len(images)), counts)
    boxes = arrays["boxes"].astype(np.float64)
    _check_objects(path, boxes, arrays["labels"], image_of, images.shape[-2:], num_classes)
    x = to_float_or_fail(images, path)
    x = x[:, None] if x.dim() == 3 else x
    if not torch.isfinite(x).all():
        raise EvalDataError(f"{path}: images contain NaN or infinite values")
    x, (scale, offset) = letterbox(x, input_shape[1:])
    x = fit_to_input(x, input_shape, str(path))
    return _as_eval_data(x, [b * scale + offset for b in per_image(boxes, counts)],
                         per_image(arrays["labels"], counts), domain, path)  # fmt: skip


def _as_eval_data(x: torch.Tensor, boxes: list[np.ndarray], labels: list, domain: InputDomain,
                  path: Path) -> DetectionEvalData:  # fmt: skip
    """(N, C, H, W) images in [0, 1] at the teacher's size, with each image's boxes (pixels of
    that size) and labels, as the teacher's eval data."""
    truths = [GroundTruth(torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4),
                          torch.as_tensor(np.asarray(k, dtype=np.int64).reshape(-1)))
              for b, k in zip(boxes, labels)]  # fmt: skip
    return DetectionEvalData(domain.to_model(x).float().contiguous(), torch.arange(len(x)),
                             str(path), truths)  # fmt: skip
