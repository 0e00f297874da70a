"""Segmentation evaluation data: images with integer masks, from a .npz or from folders of
images and PNG masks (the shared readers and limits are in ``evaldata``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compress_toolbox.domain import InputDomain
from compress_toolbox.tasks.evaldata import (
    IMAGE_SUFFIXES,
    EvalData,
    EvalDataError,
    check_sample_count,
    fit_to_input,
    open_image,
    read_npz,
    require_regular_file,
    to_float,
    to_float_or_fail,
)
from compress_toolbox.tasks.segmetrics import IGNORE_INDEX

MASK_FOLDERS = ("masks", "labels", "annotations", "SegmentationClass")  # beside the images


def load_mask_data(path: Path, input_shape: tuple[int, ...], domain: InputDomain,
                   num_classes: int | None) -> EvalData:  # fmt: skip
    """Images and their integer masks for a segmentation teacher: a .npz with ``x`` and ``y``
    (N, H, W), or a folder of images whose masks are PNGs of the same stem in a sibling folder
    (``masks``, ``labels``, ``annotations`` or VOC's ``SegmentationClass``), or a folder holding
    ``images/`` and ``masks/``. Masks must have their image's size and hold classes in
    [0, num_classes) or 255 (ignore); they are resized with the images (nearest)."""

    if len(input_shape) != 3:
        raise EvalDataError(f"{path}: a segmentation teacher takes images, not {input_shape}")
    if path.is_dir():
        x, masks, names = _load_mask_folder(path, input_shape)
    elif path.suffix.lower() == ".npz":
        require_regular_file(path)
        raw_x, raw_y = read_npz(path, input_shape)
        x = to_float_or_fail(raw_x, path)
        x = x[:, None] if x.dim() == 3 else x
        masks, names = np.asarray(raw_y), None
        if masks.ndim != 3 or len(masks) != len(x) or masks.shape[-2:] != tuple(x.shape[-2:]):
            expected = (len(x), *x.shape[-2:])
            raise EvalDataError(f"{path}: masks y have shape {masks.shape}; expected (N, H, W) "
                                f"= {expected}, one per image of its size")  # fmt: skip
        masks = [masks]
    else:
        raise EvalDataError(
            f"{path}: unsupported segmentation eval data (use a .npz with x and "
            "y masks, or a folder of images beside a folder of PNG masks)"
        )
    y = torch.cat([_checked_masks(m, num_classes, names[i] if names else path, IGNORE_INDEX)
                   for i, m in enumerate(masks)])  # fmt: skip
    if x.dim() != 4 or not torch.isfinite(x).all():
        raise EvalDataError(f"{path}: images must be finite (N, H, W) or (N, C, H, W) arrays")
    if tuple(x.shape[-2:]) != tuple(input_shape[1:]):
        y = F.interpolate(y[:, None].float(), size=input_shape[1:], mode="nearest")[:, 0].long()
    x = fit_to_input(x, input_shape, str(path))
    return EvalData(x=domain.to_model(x).float().contiguous(), y=y, source=str(path))


def _checked_masks(masks: np.ndarray, num_classes: int | None, source, ignore: int) -> torch.Tensor:
    """(N, H, W) long masks; one line naming ``source`` for a non-integer mask or a label
    outside [0, num_classes) other than ``ignore``."""
    masks = np.asarray(masks)
    if not np.issubdtype(masks.dtype, np.integer):
        raise EvalDataError(f"{source}: masks must hold integer class indices, got {masks.dtype}")
    masks = masks.astype(np.int64)
    if masks.ndim == 2:
        masks = masks[None]
    bad = masks[(masks != ignore) & ((masks < 0) | (masks >= (num_classes or 2**31)))]
    if bad.size:
        classes = f"{num_classes} classes (0..{num_classes - 1}, {ignore} = ignore)"
        raise EvalDataError(f"{source}: mask label {int(bad.flat[0])} is outside the teacher's "
                            f"{classes}")  # fmt: skip
    return torch.from_numpy(masks)


def _mask_folder(images: Path) -> Path:
    for name in MASK_FOLDERS:
        if (images.parent / name).is_dir() and (images.parent / name) != images:
            return images.parent / name
    raise EvalDataError(f"{images}: no mask folder beside it (expected one of "
                        f"{', '.join(MASK_FOLDERS)} next to {images.name})")  # fmt: skip


def _load_mask_folder(
    folder: Path, input_shape: tuple[int, ...]
) -> tuple[torch.Tensor, list, list]:
    """Images of ``folder`` (or ``folder/images``) as one (N, C, H, W) float tensor, their masks
    (one (H, W) array each) and the mask files."""
    if (folder / "images").is_dir():
        folder = folder / "images"
    masks_dir = _mask_folder(folder)
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EvalDataError(f"{folder}: no images found")
    check_sample_count(len(files), folder, input_shape)
    channels = input_shape[0]
    images, masks, names = [], [], []
    for file in files:
        mask_file = masks_dir / f"{file.stem}.png"
        if not mask_file.is_file():
            raise EvalDataError(f"{mask_file}: missing (the mask of {file.name})")
        array = open_image(file, "L" if channels == 1 else "RGB")
        mask = open_image(mask_file)
        if mask.shape != array.shape[:2]:
            mask_size, image_size = (f"{a.shape[1]}x{a.shape[0]}" for a in (mask, array))
            raise EvalDataError(f"{mask_file}: mask is {mask_size}, its image {file.name} is "
                                f"{image_size}")  # fmt: skip
        images.append(array if array.ndim == 3 else array[..., None])
        masks.append(mask)
        names.append(mask_file)
    if len({image.shape for image in images}) > 1:
        raise EvalDataError(f"{folder}: images of different sizes; give images of one size")
    x = to_float(np.stack(images)).permute(0, 3, 1, 2)
    return x, masks, names
