"""DAFL for detection heads (``--task detection``): DAFL's generator losses read per location.

- one-hot: at the teacher's confident locations (above the detection threshold, and at least
  its ``TOP_FRACTION`` best per image), each location's class scores are pushed towards a
  one-hot of their best class: sharp, confident objects;
- information entropy: the mean class distribution over all confident locations of the batch
  should be uniform: scenes of every class, not one;
- activation: as DAFL, strong features before the teacher's last 1x1 convolution.

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


@register_method
class DAFLDetection(DAFL):
    name = "dafl-det"
    summary = "DAFL per location of a detection head: one-hot, class balance, activation"
    loss_names = ("oh", "ie", "a")

    @classmethod
    def unavailable_reason(cls, ctx: MethodContext) -> str | None:
        if not hasattr(ctx.task, "layout_of"):
            return "it reads detection heads only (--task detection)"
        return None

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.layout_of = ctx.task.layout_of

    def loss_terms(self, x, logits, labels) -> dict[str, tuple[float, torch.Tensor]]:
        preset, layout = self.ctx.preset, self.layout_of(logits)
        scores = layout.class_scores(logits)
        confident = scores[confident_locations(layout.confidence(logits).detach())]
        terms = {
            "oh": (preset.w_oh, location_one_hot_loss(confident)),
            "ie": (preset.w_ie, location_entropy_loss(confident)),
        }
        if self.features is not None:
            terms["a"] = (preset.w_a, self._activation())
        return terms
