"""The one numeric verification: a model that should compute what a reference computes is run
beside it on the same random inputs; non-finite outputs, other shapes or a relative difference
above the tolerance (which follows the weights' precision; differences below ABS_TOLERANCE always
pass) are errors naming the file. Teacher imports (load/importers/, TensorFlow's through the
outputs it recorded) and the exported student (export/writer.py) all use it, at the batch sizes
set here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from compress_toolbox.errors import VerificationFailed, first_line

Runner = Callable[[np.ndarray], np.ndarray]  # float32 batch -> first output

# max |candidate - reference| / max |reference|, by the precision of the weights
TOLERANCE = {"float32": 1e-4, "float64": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
# below this absolute difference outputs agree whatever their scale: a sigmoid map of ~1e-6
# differing by 4e-9 (float32 rounding) is 4e-3 relative, which is no disagreement
ABS_TOLERANCE = 1e-6
IMPORT_BATCHES = (1, 3)  # an imported teacher against its original file
EXPORT_BATCHES = (1, 7)  # student.onnx against the trained student (7: not a power of two)


def tolerance_for(dtype: str) -> float:
    """The relative tolerance for weights stored as ``dtype`` (a numpy/torch dtype name)."""
    return TOLERANCE.get(str(dtype).replace("torch.", ""), TOLERANCE["float32"])


def random_inputs(input_shape: Sequence[int], batch: int, seed: int = 0) -> torch.Tensor:
    """The same standard-normal batch for a given shape, batch and seed, everywhere."""
    generator = torch.Generator().manual_seed(seed + batch)
    return torch.randn(batch, *input_shape, generator=generator)


def compare(
    candidate: Runner,
    reference: Runner,
    input_shape: Sequence[int],
    *,
    source: str | Path,
    what: str,
    batches: Sequence[int] = IMPORT_BATCHES,
    seed: int = 0,
    rtol: float = TOLERANCE["float32"],
) -> tuple[float, float]:
    """(max abs, max relative) difference of ``candidate`` vs ``reference`` over ``batches``
    of the same random inputs.

    ``what`` names the candidate in messages ("imported model", "student.onnx").
    """
    pairs = []
    for batch in batches:
        x = random_inputs(input_shape, batch, seed).numpy()
        try:
            expected = np.asarray(reference(x), dtype=np.float64)
        except Exception as error:
            first = first_line(error)
            raise VerificationFailed(
                f"{source}: the original model does not run on inputs of shape "
                f"{tuple(input_shape)} ({type(error).__name__}: {first})"
            ) from error
        pairs.append((x, expected))
    return compare_to_outputs(candidate, pairs, source=source, what=what, rtol=rtol)


def compare_to_outputs(
    candidate: Runner,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    source: str | Path,
    what: str,
    rtol: float = TOLERANCE["float32"],
    original: str = "the original",
) -> tuple[float, float]:
    """(max abs, max relative) difference of ``candidate`` on each input of ``pairs`` vs the
    original's recorded output (TensorFlow's, recorded in its own process, or ``compare``'s)."""
    max_abs = max_rel = 0.0
    for x, expected in pairs:
        expected = np.asarray(expected, dtype=np.float64)
        if not np.isfinite(expected).all():
            raise VerificationFailed(
                f"{source}: the original model outputs NaN or infinity on random inputs "
                "(damaged or non-finite weights?)"
            )
        try:
            got = np.asarray(candidate(x), dtype=np.float64)
        except Exception as error:  # the converted graph itself is broken
            first = first_line(error)
            raise VerificationFailed(
                f"{source}: the {what} fails at batch {len(x)} ({type(error).__name__}: {first})"
            ) from error
        if got.shape != expected.shape:
            raise VerificationFailed(
                f"{source}: the {what} gives shape {got.shape}, {original} {expected.shape}"
            )
        if not np.isfinite(got).all():
            raise VerificationFailed(
                f"{source}: the {what} outputs NaN or infinity where the original does not"
            )
        diff = float(np.abs(got - expected).max()) if got.size else 0.0
        scale = max(float(np.abs(expected).max()), 1e-6)
        max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / scale)
    if max_rel > rtol and max_abs > ABS_TOLERANCE:
        raise VerificationFailed(
            f"{source}: the {what} differs from {original} by {max_rel:.2e} (relative max, "
            f"limit {rtol:.0e}; abs {max_abs:.2e})"
        )
    return max_abs, max_rel
