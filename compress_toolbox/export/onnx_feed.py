"""Caller inputs as onnxruntime feeds: a batch (an array, a tuple in input order or a dict by
input name; torch tensors too) as a feed dict in each input's dtype (``as_feed``), and the
calibration inputs ``quantize_onnx`` takes re-chunked into equal batches for onnxruntime's
calibrator (``calibration_feeds``, ``BatchReader``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from compress_toolbox.errors import DaflError, QuantizeError, first_line

# A batch for a one-input model is an array; for several inputs, a tuple in the model's input
# order or a dict by input name.
Batch = Union[np.ndarray, Sequence[np.ndarray], Mapping[str, np.ndarray]]  # noqa: UP007
Calibration = Union[np.ndarray, Iterable[Batch], Callable[[int], Batch]]  # noqa: UP007


def as_feed(batch: Batch, inputs: list[tuple[str, np.dtype]],
             where: Path) -> dict[str, np.ndarray]:  # fmt: skip
    """One caller batch as an onnxruntime feed dict, in each input's dtype."""
    if isinstance(batch, Mapping):
        arrays = [batch[name] for name, _ in inputs if name in batch]
    elif len(inputs) == 1 and not isinstance(batch, (tuple, list)):
        arrays = [batch]
    else:
        arrays = list(batch)
    if len(arrays) != len(inputs):
        names = ", ".join(name for name, _ in inputs)
        raise QuantizeError(f"{where}: a batch of {len(arrays)} arrays for a model that takes "
                            f"{len(inputs)} inputs ({names})")  # fmt: skip
    return {name: np.ascontiguousarray(_numpy(a), dtype=dtype)
            for (name, dtype), a in zip(inputs, arrays)}  # fmt: skip


def _numpy(array) -> np.ndarray:
    # torch tensors (a generator's output) without importing torch here
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def slice_feed(feed: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {name: array[start:stop] for name, array in feed.items()}


def calibration_feeds(calibration: Calibration, inputs: list[tuple[str, np.dtype]],
                      samples: int, batch: int,
                      where: Path) -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
    """Feed dicts of exactly ``batch`` samples, ``samples`` in all at most, re-chunked across
    the caller's batches: onnxruntime's histogram calibrators (Entropy, Percentile) stack every
    batch's activations into one array and fail on unequal batches. A remainder smaller than
    ``batch`` is dropped unless it is all there is."""
    batch = min(batch, samples)
    if callable(calibration):
        def source() -> Iterator[Batch]:
            while True:
                yield calibration(batch)
        batches: Iterable[Batch] = source()
    elif isinstance(calibration, np.ndarray) or hasattr(calibration, "detach"):
        batches = [calibration]
    else:
        batches = calibration
    pending: list[dict[str, np.ndarray]] = []
    fed = held = 0
    for item in batches:
        feed = as_feed(item, inputs, where)
        size = len(next(iter(feed.values())))
        if size == 0:
            break  # an exhausted generator must not spin forever
        pending.append(feed)
        held += size
        while held >= batch and fed + batch <= samples:
            joined = _concat(pending)
            yield slice_feed(joined, 0, batch)
            fed, held = fed + batch, held - batch
            pending = [slice_feed(joined, batch, len(next(iter(joined.values()))))]
        if fed + batch > samples:
            return
    if fed == 0 and held:
        yield _concat(pending)


def _concat(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(feeds) == 1:
        return feeds[0]
    return {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}


class BatchReader(CalibrationDataReader):
    """Feeds onnxruntime's calibrator one batch (a feed dict) at a time and counts samples."""

    def __init__(self, feeds: Iterator[dict[str, np.ndarray]], model: Path):
        self._feeds = feeds
        self._model = model
        self.samples = 0
        self.exhausted = False  # the caller's data ran out (rather than onnxruntime stopping)

    def get_next(self) -> dict[str, np.ndarray] | None:
        try:
            feed = next(self._feeds, None)
        except DaflError:
            raise
        except Exception as error:  # the caller's generator, not onnxruntime
            raise QuantizeError(f"{self._model}: the calibration inputs failed "
                                f"({type(error).__name__}: {first_line(error)})") from error
        if feed is None:
            self.exhausted = True
        else:
            self.samples += len(next(iter(feed.values())))
        return feed
