"""Calibration inputs for INT8 quantisation (export/int8.py): fresh draws from the trained
generator (the data-free case), or an array of inputs read from a file (an existing output
folder holds no generator)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress_toolbox.errors import DaflError, first_line
from compress_toolbox.export.verification import random_inputs

Sampler = Callable[[int], torch.Tensor]  # n -> n fresh generated inputs (DistillResult.sampler)
MAX_CALIBRATION_BYTES = 2 * 2**30  # a file declaring more is refused before it is read


@dataclass(frozen=True)
class CalibrationSource:
    """Where calibration (and agreement-check) inputs come from: ``draw(n)`` gives ``n`` inputs
    as the model takes them; ``what`` says where they come from, for the report."""

    draw: Callable[[int], np.ndarray]
    what: str


def from_sampler(sampler: Sampler | None, input_shape: tuple[int, ...],
                 conditional: bool = False) -> CalibrationSource:  # fmt: skip
    """Fresh generated inputs (the generator's augmentations included). A class-conditional
    generator draws its labels balanced in every batch (``arange(n) % K``), so the calibration
    set is class-balanced. Without a generator: standard-normal noise, and the report says so."""
    if sampler is None:
        return CalibrationSource(lambda n: random_inputs(input_shape, n).numpy(),
                                 "standard-normal noise (no generator)")  # fmt: skip

    def draw(n: int) -> np.ndarray:
        return sampler(n).detach().float().cpu().numpy()

    balanced = ", class-balanced" if conditional else ""
    return CalibrationSource(draw, f"inputs of the trained generator{balanced}")


def from_array(inputs: np.ndarray | torch.Tensor, what: str = "the given inputs"
               ) -> CalibrationSource:  # fmt: skip
    """Inputs already made (first axis = samples), used in order and cycled when more are
    asked for than there are."""
    array = np.ascontiguousarray(
        inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else inputs,
        dtype=np.float32,
    )
    if array.ndim < 2 or len(array) == 0:
        raise DaflError(f"{what}: calibration inputs need shape (N, ...) with N >= 1, "
                        f"not {array.shape}")  # fmt: skip
    position = [0]

    def draw(n: int) -> np.ndarray:
        index = (position[0] + np.arange(n)) % len(array)
        position[0] = int(index[-1] + 1) if n else position[0]
        return array[index]

    return CalibrationSource(draw, f"{len(array)} inputs from {what}")


def from_file(path: Path) -> CalibrationSource:
    """Inputs from a ``.npy`` array or the ``x`` array of an ``.npz`` (else its only array),
    read without pickles and fed as they are (already normalised as the model takes them)."""
    path = Path(path)
    if not path.is_file():
        raise DaflError(f"{path}: no such calibration file")
    if path.stat().st_size > MAX_CALIBRATION_BYTES:
        raise DaflError(f"{path}: larger than {MAX_CALIBRATION_BYTES >> 30} GiB; pass fewer "
                        "calibration inputs")  # fmt: skip
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # .npy
            array = loaded
        else:
            with loaded:
                array = loaded[_array_name(loaded, path)]
    except DaflError:
        raise
    except Exception as error:
        raise DaflError(f"{path}: not a readable .npy/.npz ({first_line(error)})") from error
    if not np.issubdtype(array.dtype, np.number):
        raise DaflError(f"{path}: calibration inputs must be numbers, not {array.dtype}")
    return from_array(array, str(path))


def _array_name(archive, path: Path) -> str:
    names = list(archive.files)
    if "x" in names:
        return "x"
    if len(names) == 1:
        return names[0]
    raise DaflError(f"{path}: an .npz of calibration inputs needs an array named x "
                    f"(it holds {', '.join(names) or 'nothing'})")  # fmt: skip
