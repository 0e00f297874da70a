"""DAFL for detection heads (``--task detection``): DAFL's generator losses read per location.

- one-hot: at the teacher's confident locations (above the detection threshold, and at least
  its ``TOP_FRACTION`` best per image), each location's class scores are pushed towards a
  one-hot of their best class: sharp, confident objects;
- information entropy: the mean class distribution over all confident locations of the batch
  should be uniform: scenes of every class, not one;
- activation: as DAFL, strong features before the teacher's last 1x1 convolution.

The student learns from half generated images as they are and half multi-object scenes: the
objects the teacher sees in one to three generated images (each image cut to the box of its
most confident detection, read through the user's --decode where given)
pasted on a plain noisy background, their longest side 17-42% of the
canvas (as DIODE's tiles and Multi-Object Impressions compose several objects per canvas).
Generated images alone are objects everywhere: a student distilled on them only learnt the
teacher's answers there and lost the background (on the benchmark its mAP@0.5 on real scenes
peaked at 0.27 after 35 s and fell to 0.01 by 190 s while it agreed ever better on generated
inputs). Whole generated images pasted instead of the teacher's objects are textured squares:
6.9-8.5 points of the teacher's mAP@0.5 lower (benchmarks/RESULTS.md).

The head's layout comes from the task (``tasks/detection``), whose KD loss trains the student.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compress_toolbox.distillation.distributed import global_mean
from compress_toolbox.distillation.methods import register_method
from compress_toolbox.distillation.methods.base import MethodContext
from compress_toolbox.distillation.methods.dafl import DAFL
from compress_toolbox.distillation.scenes import SceneBatches

OBJECT_MARGIN = 1.25  # an object's cut: its box grown by a quarter (edges and some background)
MIN_OBJECT_SIDE = 4.0  # pixels: a smaller box is cut at this size
TOP_FRACTION = 0.05  # share of each image's locations always counted as confident
CONFIDENT = 0.25  # a score above this is a detection


def confident_locations(confidence: torch.Tensor) -> torch.Tensor:
    """(N, A) mask: scores above ``CONFIDENT`` and each image's best ``TOP_FRACTION``."""
    top = max(1, math.ceil(confidence.shape[1] * TOP_FRACTION))
    mask = confidence >= CONFIDENT
    mask.scatter_(1, confidence.topk(top, dim=1).indices, True)
    return mask


def location_one_hot_loss(scores: torch.Tensor) -> torch.Tensor:
    """BCE of (M, K) class scores against the one-hot of their best class."""
    target = F.one_hot(scores.argmax(1), scores.shape[1]).float()
    return F.binary_cross_entropy(scores.clamp(1e-6, 1 - 1e-6), target)


def location_entropy_loss(scores: torch.Tensor) -> torch.Tensor:
    """Minus the entropy of the mean class distribution of (M, K) scores (every rank's)."""
    distribution = scores / scores.sum(1, keepdim=True).clamp_min(1e-6)
    mean = global_mean(distribution)
    return (mean * torch.log(mean.clamp_min(1e-12))).sum()


def teacher_objects(images: torch.Tensor, boxes: torch.Tensor) -> list[torch.Tensor]:
    """Each of ``images`` (N, C, H, W) cut to its (N, 4) centre/size box in pixels, grown by
    ``OBJECT_MARGIN`` and clipped to the image; a box that leaves less than 2 px keeps the
    whole image."""
    height, width = images.shape[-2:]
    cuts = []
    for image, (cx, cy, w, h) in zip(images, boxes.tolist()):
        w, h = (max(MIN_OBJECT_SIDE, OBJECT_MARGIN * side) for side in (w, h))
        x0, y0 = int(max(0, cx - w / 2)), int(max(0, cy - h / 2))
        x1, y1 = int(min(width, cx + w / 2)), int(min(height, cy + h / 2))
        cuts.append(image[:, y0:y1, x0:x1] if x1 - x0 >= 2 and y1 - y0 >= 2 else image)
    return cuts


@register_method
class DAFLDetection(SceneBatches, DAFL):
    name = "dafl-det"
    summary = "DAFL per location of a detection head: one-hot, class balance, activation"
    loss_names = ("oh", "ie", "a", "div")

    @classmethod
    def unavailable_reason(cls, ctx: MethodContext) -> str | None:
        if not hasattr(ctx.task, "layout_of"):
            return "it reads detection heads only (--task detection)"
        return None

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.layout_of = ctx.task.layout_of
        self.object_boxes = ctx.task.object_boxes

    def scene_pieces(self, images: torch.Tensor, teacher_out: torch.Tensor
                     ) -> tuple[list[torch.Tensor], None]:  # fmt: skip
        """What the teacher sees in each generated image: the image cut to the box of its most
        confident detection; the whole image where the boxes are encoded against anchors and
        no --decode places them."""
        boxes = self.object_boxes(teacher_out.detach(), tuple(images.shape[-2:]))
        return (list(images) if boxes is None else teacher_objects(images, boxes)), None

    def loss_terms(self, x, logits, labels) -> dict[str, tuple[float, torch.Tensor]]:
        weights, layout = self.weights, self.layout_of(logits)
        scores = layout.class_scores(logits)
        confident = scores[confident_locations(layout.confidence(logits).detach())]
        return {
            "oh": (weights.oh, location_one_hot_loss(confident)),
            "ie": (weights.ie, location_entropy_loss(confident)),
            **self.feature_terms(),
        }
