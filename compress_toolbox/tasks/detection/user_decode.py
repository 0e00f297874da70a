"""--decode FILE.py:FUNCTION: the user's own decoding of the raw head outputs, for heads whose
boxes are encoded against anchors the file does not hold (SSD, RetinaNet, FCOS). With it the
report scores both models the way the user's code reads them: mAP on --eval-data, fidelity
on decoded boxes, boxes drawn in samples.png; dafl-det cuts the teacher's objects out of
generated images by it. Distillation still acts on the raw outputs.

The function is called as ``FUNCTION(outputs, image_size)``: ``outputs`` a tuple of the raw
outputs as float tensors on the CPU (batch first, in the file's order), ``image_size`` the input's
(height, width); it returns one mapping per image with ``boxes`` (D, 4) as x1, y1, x2, y2 in
input pixels, ``scores`` (D,) and ``labels`` (D,) as class indices 0..K-1 (torchvision's
detection format; K without a softmax head's background column), after its own score
threshold and NMS.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from compress_toolbox.errors import DaflError, first_line
from compress_toolbox.load.user_code import load_object, user_file
from compress_toolbox.tasks.detection.decode import Detections
from compress_toolbox.tasks.detection.heads import HeadLayout

OPTION = "--decode"


@functools.lru_cache(maxsize=8)
def _function(spec: str) -> Callable:
    found = load_object(spec, OPTION)
    if not callable(found):
        raise DaflError(f"{OPTION} {spec}: {type(found).__name__} is not a function")
    return found


@dataclass(frozen=True)
class UserDecoder:
    """The user's decoding function, named by ``spec`` (``file.py:FUNCTION``; loaded when first
    called, so that a task holding it stays picklable) or given as a callable."""

    spec: str | Callable

    @property
    def name(self) -> str:
        """How the report and messages name it."""
        return self.spec if isinstance(self.spec, str) else getattr(self.spec, "__qualname__",
                                                                     repr(self.spec))  # fmt: skip

    def file(self):
        """The file it runs (None for a callable or an installed module)."""
        return user_file(self.spec) if isinstance(self.spec, str) else None

    def function(self) -> Callable:
        """The callable itself (DaflError naming --decode when it cannot be loaded)."""
        return _function(self.spec) if isinstance(self.spec, str) else self.spec

    @torch.no_grad()
    def __call__(self, out: torch.Tensor, layout: HeadLayout,
                 image_size: tuple[int, int]) -> list[Detections]:  # fmt: skip
        """Every image's detections from the joined raw output ``out``; DaflError naming
        --decode when the function fails or answers in another form."""
        outputs = tuple(part.detach().float().cpu() for part in layout.file_outputs(out))
        try:
            found = self.function()(outputs, tuple(image_size))
        except DaflError:
            raise
        except Exception as error:
            raise self._error(f"it raised {type(error).__name__}: {first_line(error)}") from None
        if not isinstance(found, (list, tuple)) or len(found) != len(out):
            raise self._error(f"it returned {type(found).__name__}, not a list of one mapping "
                              f"per image ({len(out)})")  # fmt: skip
        return [self._detections(one, layout.num_classes) for one in found]

    def _detections(self, one: Any, num_classes: int) -> Detections:
        if not isinstance(one, Mapping) or not {"boxes", "scores", "labels"} <= set(one):
            raise self._error("each image's answer must be a mapping with boxes, scores and "
                              "labels")  # fmt: skip
        boxes, scores, labels = (torch.as_tensor(one[key]).detach().cpu()
                                 for key in ("boxes", "scores", "labels"))  # fmt: skip
        if boxes.numel() == 0:  # "no detections" as an empty list or array
            boxes = boxes.reshape(0, 4)
        count = len(scores.reshape(-1))
        if tuple(boxes.shape) != (count, 4) or labels.numel() != count:
            shapes = f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}"
            raise self._error(f"boxes, scores, labels of shapes {shapes}: not D boxes (D, 4) "
                              "with D scores and D labels")  # fmt: skip
        labels = labels.reshape(-1).long()
        if count and (labels.min() < 0 or labels.max() >= num_classes):
            raise self._error(f"labels run {int(labels.min())}..{int(labels.max())}; the head "
                              f"has {num_classes} classes (0..{num_classes - 1})")  # fmt: skip
        return Detections(boxes.float(), scores.reshape(-1).float(), labels)

    def _error(self, problem: str) -> DaflError:
        return DaflError(f"{OPTION} {self.name}: {problem}")
