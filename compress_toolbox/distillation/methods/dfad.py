"""DFAD (Fang et al. 2019, arXiv 1912.11006): adversarial data-free distillation, which the
paper applies to semantic segmentation. The generator maximises the student-teacher discrepancy
(mean absolute difference of the logits, per pixel for a segmentation teacher) and the student
minimises its KD loss on the same inputs; DAFL's information-entropy term keeps the generated
inputs spread over the teacher's classes (the collapse guard watches that)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress_toolbox.distillation.losses import information_entropy_loss, logit_discrepancy
from compress_toolbox.distillation.methods import LossWeights, register_method
from compress_toolbox.distillation.methods.base import GeneratorMethod


@dataclass(frozen=True)
class DfadWeights(LossWeights):
    """DFAD's loss weights."""

    adv: float = 1.0  # minus the student-teacher discrepancy
    ie: float = 5.0  # DAFL's information entropy: inputs spread over the classes
    entropy_base: float = 10.0  # of the information entropy


@register_method
class DFAD(GeneratorMethod):
    name = "dfad"
    summary = "DFAD: generator maximises the (pixel-wise) student-teacher discrepancy"
    loss_names = ("adv", "ie")
    weights_type = DfadWeights
    weights: DfadWeights

    def loss_terms(self, x, logits, labels) -> dict[str, tuple[float, torch.Tensor]]:
        weights = self.weights
        return {
            "adv": (weights.adv, -logit_discrepancy(self.student_logits(x), logits)),
            "ie": (weights.ie, information_entropy_loss(logits, weights.entropy_base)),
        }
