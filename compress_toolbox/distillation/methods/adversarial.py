"""DAFL plus adversarial exploration (DFAD, Fang et al. 2019; ZSKT, Micaelli & Storkey 2019):
the generator also seeks inputs where the student still disagrees with the teacher."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress_toolbox.distillation.losses import adversarial_loss
from compress_toolbox.distillation.methods import register_method
from compress_toolbox.distillation.methods.dafl import DAFL, DaflWeights


@dataclass(frozen=True)
class AdversarialWeights(DaflWeights):
    """DAFL's weights (a preset's ``dafl`` values apply here too) and the adversarial term's."""

    adv: float = 1.0  # student-teacher discrepancy the generator seeks


@register_method
class AdversarialDAFL(DAFL):
    name = "adversarial"
    summary = "DAFL's losses plus adversarial exploration of student-teacher disagreement"
    loss_names = (*DAFL.loss_names, "adv")
    weights_type = AdversarialWeights
    weights: AdversarialWeights

    def loss_terms(self, x, logits, labels) -> dict[str, tuple[float, torch.Tensor]]:
        terms = super().loss_terms(x, logits, labels)
        terms["adv"] = (self.weights.adv, adversarial_loss(self.student_logits(x), logits))
        return terms
