"""Optional labelled evaluation data (never used for training): .npz, MNIST idx or ImageFolder;
for segmentation teachers, .npz with integer masks or a folder of images beside a folder of PNG
masks (255 = ignore)."""

from __future__ import annotations

import gzip
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError, DaflWarning
from compress_toolbox.limits import available_memory
from compress_toolbox.tasks.segmetrics import IGNORE_INDEX, score_masks

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class EvalDataError(DaflError):
    """Evaluation data could not be read or does not fit the teacher."""


@dataclass
class EvalData:
    """Preprocessed evaluation set: float ``x`` shaped like the teacher input, long labels ``y``
    (N,) for a classifier, or masks (N, H, W) for a segmentation teacher."""

    x: torch.Tensor
    y: torch.Tensor
    source: str = ""

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int) -> EvalData:
        """A fixed random subset of at most ``n`` samples (cheap accuracy checks in training)."""
        if len(self) <= n:
            return self
        keep = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:n]
        return EvalData(self.x[keep], self.y[keep], f"{self.source} ({n} of {len(self)})")


def describe_preprocessing() -> str:
    """How eval data is turned into teacher inputs (for --help)."""
    return (
        "Evaluation data (.npz with x and y, a folder of MNIST idx files, or an ImageFolder of "
        "class sub-folders) is converted to float in [0, 1] (uint8 / 255), gray images are "
        "repeated to 3 channels (RGB averaged to gray) when the teacher wants it, images are "
        "resized to the teacher's H x W (bilinear, align_corners=False) when sizes differ, then "
        "normalised as (x - mean) / std when --mean/--std are given (a float or one per channel). "
        "Segmentation (--task segmentation): a .npz with x (N,H,W or N,C,H,W) and integer masks y "
        "(N,H,W; 255 = ignore), or a folder of images with a sibling folder 'masks' of PNG masks "
        "of the same names (pixel value = class); masks are resized with the images (nearest)."
    )


MAX_EVAL_BYTES = 4 * 2**30  # a declared payload above this is refused before reading it
MAX_EVAL_SAMPLES = 1_000_000  # ImageNet's validation set is 50,000; COCO's 5,000
MAX_IMAGE_PIXELS = 2**26  # 8192 x 8192; Pillow's own bomb check stops only at 2 x 89 M
EXPANDED_SHARE_OF_FREE = 0.25  # the float32 set at the teacher's size may take this much
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def require_regular_file(path: Path) -> None:
    """Refuse FIFOs, devices and sockets (reading them can hang or never end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise EvalDataError(f"{path}: cannot read ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        raise EvalDataError(f"{path}: not a regular file")


def read_idx(path: str | Path, count: int | None = None) -> np.ndarray:
    """Read an MNIST-style idx file (gzipped or not) into a numpy array.

    The header is checked before the payload is read: a declared size above MAX_EVAL_BYTES,
    or a first dimension other than ``count`` (the number of labels), is refused without
    decompressing anything more (a small gzip file can expand to gigabytes).
    """
    path = Path(path)
    require_regular_file(path)
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as handle:
            return _read_idx_stream(handle, path, count)
    except (OSError, EOFError) as error:
        raise EvalDataError(f"{path}: cannot read ({error})") from None


def _read_idx_stream(handle, path: Path, count: int | None) -> np.ndarray:
    magic = handle.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
        raise EvalDataError(f"{path}: not an idx file (bad magic number)")
    ndim = magic[3]
    raw_dims = handle.read(4 * ndim)
    if ndim == 0 or len(raw_dims) < 4 * ndim:
        raise EvalDataError(f"{path}: truncated idx header")
    dims = tuple(int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[magic[2]])
    expected = math.prod(dims) * dtype.itemsize
    if expected > MAX_EVAL_BYTES:
        raise EvalDataError(
            f"{path}: idx header declares {expected / 2**30:.1f} GiB of data "
            f"(more than {MAX_EVAL_BYTES / 2**30:.0f} GiB); use a smaller evaluation set"
        )
    if count is not None and dims[0] != count:
        raise EvalDataError(f"{path}: {dims[0]} images but {count} labels")
    check_sample_count(dims[0], path)
    data = handle.read(expected + 1)
    if len(data) != expected:
        raise EvalDataError(f"{path}: idx payload has {len(data)} bytes, header says {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(dims)


def check_sample_count(count: int, path: Path, input_shape: tuple[int, ...] = ()) -> None:
    """Refuse a set of more than MAX_EVAL_SAMPLES, or one whose float32 copy at the teacher's
    ``input_shape`` would not fit in a quarter of the free memory: a small compressed file can
    declare far more than its own size, and what it expands to is what counts."""
    if count > MAX_EVAL_SAMPLES:
        raise EvalDataError(f"{path}: declares {count:,} samples (more than "
                            f"{MAX_EVAL_SAMPLES:,}); use a smaller evaluation set")  # fmt: skip
    expanded = count * math.prod(input_shape) * 4
    free = available_memory(torch.device("cpu"))
    limit = MAX_EVAL_BYTES if free is None else min(MAX_EVAL_BYTES, free * EXPANDED_SHARE_OF_FREE)
    if input_shape and expanded > limit:
        raise EvalDataError(
            f"{path}: {count:,} samples of {'x'.join(map(str, input_shape))} take "
            f"{expanded / 2**30:.1f} GiB as float32 (more than {limit / 2**30:.1f} GiB, a quarter "
            "of the free memory or 4 GiB); use a smaller evaluation set"
        )


def open_image(file: Path, mode: str | None = None) -> np.ndarray:
    """One image file as an array (converted to ``mode`` when given), refusing FIFOs and
    images over MAX_IMAGE_PIXELS before their pixels are decoded; errors name the file."""
    from PIL import Image, UnidentifiedImageError

    require_regular_file(file)  # a FIFO named a.png would block Image.open forever
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise EvalDataError(f"{file}: image is {width}x{height} pixels (more than "
                                        f"{MAX_IMAGE_PIXELS:,}); resize it first")  # fmt: skip
                if mode is None and image.mode not in ("P", "L", "I", "I;16"):
                    raise EvalDataError(f"{file}: mask is {image.mode}; expected a "
                                        "single-channel PNG of class indices")  # fmt: skip
                return np.asarray(image.convert(mode) if mode else image)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:  # fmt: skip
        raise EvalDataError(f"{file}: cannot read image ({error})") from None


def _pick(files: list[Path], kind: str, folder: Path) -> Path:
    if not files:
        raise EvalDataError(f"{folder}: no {kind} idx file (expected a name like *{kind}*idx*)")
    test = [f for f in files if re.search(r"t10k|test", f.name, re.IGNORECASE)]
    return sorted(test or files)[0]


def _load_idx_folder(folder: Path, input_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    names = [f for f in folder.iterdir() if f.is_file()]
    images = _pick([f for f in names if re.search(r"images.*idx3", f.name)], "images", folder)
    labels = _pick([f for f in names if re.search(r"labels.*idx1", f.name)], "labels", folder)
    y = read_idx(labels)
    check_sample_count(len(y), images, input_shape)
    return read_idx(images, count=len(y)), y


def _npy_shape(archive, key: str) -> tuple[int, ...]:
    """The shape an .npz member declares in its header, read without loading the array."""
    with archive.zip.open(f"{key}.npy") as member:
        major, _ = np.lib.format.read_magic(member)
        if major == 1:
            return np.lib.format.read_array_header_1_0(member)[0]
        return np.lib.format.read_array_header_2_0(member)[0]


def read_npz(path: Path, input_shape: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if not {"x", "y"} <= keys:
                raise EvalDataError(
                    f"{path}: .npz must contain arrays 'x' and 'y' (found {sorted(keys)})"
                )
            for key in ("x", "y"):
                size = archive.zip.getinfo(f"{key}.npy").file_size
                if size > MAX_EVAL_BYTES:
                    raise EvalDataError(
                        f"{path}: array '{key}' holds {size / 2**30:.1f} GiB (more than "
                        f"{MAX_EVAL_BYTES / 2**30:.0f} GiB); use a smaller evaluation set"
                    )
            shape = _npy_shape(archive, "x")
            check_sample_count(shape[0] if shape else 0, path, input_shape)
            return archive["x"], archive["y"]
    except EvalDataError:
        raise
    except Exception as error:  # noqa: BLE001 - numpy raises many types for bad files
        raise EvalDataError(f"{path}: cannot read .npz ({error})") from None


def _load_image_folder(folder: Path, input_shape: tuple[int, ...]) -> tuple[list, np.ndarray]:
    channels = input_shape[0] if len(input_shape) == 3 else 1
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise EvalDataError(f"{folder}: no class sub-folders (expected an ImageFolder layout)")
    files = [(index, file) for index, name in enumerate(classes)
             for file in sorted((folder / name).iterdir())
             if file.suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip
    check_sample_count(len(files), folder, input_shape)
    images, labels = [], []
    mode = "L" if channels == 1 else "RGB"
    for index, file in files:
        array = open_image(file, mode)
        images.append(array if array.ndim == 3 else array[..., None])
        labels.append(index)
    if not images:
        raise EvalDataError(f"{folder}: no images found in class sub-folders")
    return images, np.asarray(labels)


def to_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(np.array(x))  # copy: idx buffers are read-only
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if not tensor.is_floating_point() and tensor.dtype not in (torch.int16, torch.int32):
        raise EvalDataError(f"unsupported image dtype {tensor.dtype}")
    return tensor.float()


def fit_to_input(x: torch.Tensor, input_shape: tuple[int, ...], source: str) -> torch.Tensor:
    """(N, C, H, W) float -> teacher's channels and size."""
    channels, height, width = input_shape
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1 and x.shape[1] == 3:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x * weights).sum(1, keepdim=True)
        else:
            raise EvalDataError(
                f"{source}: images have {x.shape[1]} channels, the teacher wants {channels}"
            )
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x.contiguous()


def load_eval_data(
    path: str | Path,
    input_shape: tuple[int, ...],
    domain: InputDomain | None = None,
    num_classes: int | None = None,
    task: str = "classification",
) -> EvalData:
    """Load labelled evaluation data shaped for a teacher with ``input_shape``, mapped into its
    input ``domain`` (see ``describe_preprocessing``), as ``task`` reads it (labels for
    classification, masks for segmentation). With ``num_classes`` the labels must lie in
    [0, num_classes) (masks may also hold 255, ignored). Any problem raises ``EvalDataError``
    naming the path."""
    from compress_toolbox.tasks import get_task  # the task registry imports this module

    path = Path(path)
    if not path.exists():
        raise EvalDataError(f"{path}: no such file or directory")
    return get_task(task).load_eval_data(path, tuple(input_shape), domain or InputDomain(),
                                         num_classes)  # fmt: skip


def load_label_data(path: Path, input_shape: tuple[int, ...], domain: InputDomain,
                    num_classes: int | None) -> EvalData:  # fmt: skip
    """Images (or features) and their class labels: a .npz with ``x`` and ``y``, a folder of
    MNIST idx files or an ImageFolder."""
    if path.is_dir():
        if any(f.is_file() and re.search(r"idx[13]", f.name) for f in path.iterdir()):
            raw_x, raw_y = _load_idx_folder(path, input_shape)
        else:
            images, raw_y = _load_image_folder(path, input_shape)
            shapes = {image.shape for image in images}
            if len(input_shape) == 3 and len(shapes) > 1:  # resize one by one to a common size
                tensors = [to_float(im).permute(2, 0, 1)[None] for im in images]
                x = torch.cat([fit_to_input(t, input_shape, str(path)) for t in tensors])
                return _finish(x, raw_y, input_shape, domain, num_classes, path)
            raw_x = np.stack(images).transpose(0, 3, 1, 2)
    elif path.suffix.lower() == ".npz":
        require_regular_file(path)
        raw_x, raw_y = read_npz(path, input_shape)
    else:
        raise EvalDataError(
            f"{path}: unsupported eval data (use a .npz, a folder of idx files or an ImageFolder)"
        )
    return _finish(to_float_or_fail(raw_x, path), raw_y, input_shape, domain, num_classes, path)


def _finish(x, raw_y, input_shape, domain: InputDomain, num_classes: int | None,
            path: Path) -> EvalData:  # fmt: skip
    y_arr = np.asarray(raw_y)
    if y_arr.ndim != 1 or not np.issubdtype(y_arr.dtype, np.integer):
        raise EvalDataError(f"{path}: labels must be a 1-D integer array, got {y_arr.dtype} "
                            f"{y_arr.shape}")  # fmt: skip
    if len(x) == 0:
        raise EvalDataError(f"{path}: contains no samples")
    if len(x) != len(y_arr):
        raise EvalDataError(f"{path}: {len(x)} images but {len(y_arr)} labels")
    if len(input_shape) == 3:
        if x.dim() == 3:
            x = x[:, None]
        elif x.dim() == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
            x = x.permute(0, 3, 1, 2)  # N, H, W, C
        if x.dim() != 4:
            raise EvalDataError(
                f"{path}: images have shape {tuple(x.shape)}; expected (N, H, W) or (N, C, H, W)"
            )
        x = fit_to_input(x, input_shape, str(path))
    else:
        x = x.reshape(len(x), -1)
        if tuple(x.shape[1:]) != input_shape:
            raise EvalDataError(
                f"{path}: samples have {x.shape[1]} features, the teacher wants {input_shape[0]}"
            )
    if num_classes is not None and (y_arr.min() < 0 or y_arr.max() >= num_classes):
        bad = int(y_arr.min() if y_arr.min() < 0 else y_arr.max())
        raise EvalDataError(
            f"{path}: label {bad} is outside the teacher's {num_classes} classes "
            f"(0..{num_classes - 1})"
        )
    if not torch.isfinite(x).all():
        raise EvalDataError(f"{path}: images contain NaN or infinite values")
    if len(input_shape) == 3 and float(x.max()) > 1.5:  # a common mistake: 0-255 floats
        warnings.warn(f"{path}: float pixels go up to {float(x.max()):.0f}, but float images are "
                      "read as pixels in [0, 1]: save them as uint8, or divide by 255",
                      DaflWarning, stacklevel=2)  # fmt: skip
    x = domain.to_model(x.float())
    return EvalData(x=x.float().contiguous(), y=torch.as_tensor(y_arr.astype(np.int64)),
                    source=str(path))  # fmt: skip


@torch.no_grad()
def predict(
    module: nn.Module,
    data: EvalData,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Top-1 class of ``module`` for every sample (or every pixel) of ``data`` (module left in
    its mode)."""
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    was_training = module.training
    module.eval()
    try:
        return torch.cat([
            module(data.x[start : start + batch_size].to(device)).argmax(1).cpu()
            for start in range(0, len(data.y), batch_size)
        ])  # fmt: skip
    finally:
        module.train(was_training)


def evaluate(
    module: nn.Module,
    data: EvalData,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> float:
    """``score`` of ``module`` on ``data`` (module left in the mode it was in): top-1 accuracy,
    or mean IoU on masks."""
    return score(predict(module, data, batch_size, device), data.y)


def score(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """The headline figure of a model on labelled data: top-1 accuracy for class labels, mean
    IoU for masks (N, H, W)."""
    if labels.dim() == 1:
        return accuracy(predictions, labels)
    valid = labels[labels != IGNORE_INDEX]
    classes = 1 + max(int(predictions.max()), int(valid.max()) if valid.numel() else 0)
    return score_masks(predictions, labels, classes).mean_iou


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``predictions`` equal to ``labels`` (exact: a count over a length); for masks,
    of the pixels not labelled 255 (ignore)."""
    if labels.dim() > 1:
        keep = labels != IGNORE_INDEX
        return int((predictions[keep] == labels[keep]).sum()) / max(int(keep.sum()), 1)
    return int((predictions == labels).sum()) / len(labels) if len(labels) else 0.0


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """How many of ``labels`` name each of the ``num_classes`` classes."""
    return torch.bincount(labels.long(), minlength=num_classes)[:num_classes]


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor,
                       num_classes: int) -> list[float | None]:  # fmt: skip
    """For each class, the fraction of its labelled inputs predicted as it (its recall); None
    for a class without any."""
    counts = class_counts(labels, num_classes)
    hits = class_counts(labels[predictions == labels], num_classes)
    return [int(hit) / int(count) if count else None for hit, count in zip(hits, counts)]


def to_float_or_fail(raw: np.ndarray, path: Path) -> torch.Tensor:
    try:
        return to_float(raw)
    except EvalDataError as error:
        raise EvalDataError(f"{path}: {error}") from None
