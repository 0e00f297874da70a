"""DAFL plus adversarial exploration (DFAD, Fang et al. 2019; ZSKT, Micaelli & Storkey 2019):
the generator also seeks inputs where the student still disagrees with the teacher, and spreads
its samples over the teacher's features (DAFL's diversity term, on here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress_toolbox.distillation.losses import adversarial_loss
from compress_toolbox.distillation.methods import register_method
from compress_toolbox.distillation.methods.dafl import DAFL, DaflWeights


@dataclass(frozen=True)
class AdversarialWeights(DaflWeights):
    """DAFL's weights (a preset's ``dafl`` values apply here too), the adversarial term's, and
    the diversity term on (benchmarks/RESULTS.md, session 35: at equal iterations the suite's
    students without BatchNorm priors level or better at the median, the digits MLP's by 9
    points)."""

    adv: float = 1.0  # student-teacher discrepancy the generator seeks
    div: float = 1.0  # diversity: samples spread over the teacher's features


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
