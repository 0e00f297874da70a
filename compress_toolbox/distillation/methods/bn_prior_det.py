"""The BatchNorm-statistics prior for detection heads (DIODE, Chawla et al. WACV 2021, which
inverts a YOLOv3 as DeepInversion inverts classifiers): dafl-det's per-location losses and
multi-object scenes, plus the term that makes every BatchNorm layer of the teacher see the
mean and variance it recorded on its training images. Available when the teacher keeps its
BatchNorm layers (a checkpoint, TorchScript or .pt2; torch's ONNX export folds them away)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress_toolbox.distillation.losses import BatchNormStatistics
from compress_toolbox.distillation.methods import register_method
from compress_toolbox.distillation.methods.bn_prior import BatchNormPrior
from compress_toolbox.distillation.methods.dafl import DaflWeights
from compress_toolbox.distillation.methods.dafl_det import DAFLDetection


@dataclass(frozen=True)
class DetectionBnWeights(DaflWeights):
    """dafl-det's weights (a preset's ``dafl`` values apply here too) and the prior's."""

    bn: float = 5.0  # BatchNorm statistics (mean over the layers), as bn-prior's


@register_method
class BatchNormPriorDetection(DAFLDetection):
    name = "bn-prior-det"
    summary = "dafl-det plus the teacher's BatchNorm statistics as an image prior (DIODE)"
    loss_names = (*DAFLDetection.loss_names, "bn")
    weights_type = DetectionBnWeights
    weights: DetectionBnWeights

    @classmethod
    def unavailable_reason(cls, ctx) -> str | None:
        return super().unavailable_reason(ctx) or BatchNormPrior.unavailable_reason(ctx)

    def __init__(self, ctx) -> None:
        self.statistics = BatchNormStatistics(ctx.teacher)
        super().__init__(ctx)

    def loss_terms(self, x, logits, labels) -> dict[str, tuple[float, torch.Tensor]]:
        terms = super().loss_terms(x, logits, labels)
        terms["bn"] = (self.weights.bn, self.statistics.loss())
        return terms

    def close(self) -> None:
        self.statistics.close()
        super().close()
