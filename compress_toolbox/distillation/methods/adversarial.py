"""DAFL plus adversarial exploration (DFAD, Fang et al. 2019; ZSKT, Micaelli & Storkey 2019):
the generator also seeks inputs where the student still disagrees with the teacher, and spreads
its samples over the teacher's features (DAFL's diversity term, on here for a student that
starts from the teacher's weights)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from compress_toolbox.distillation.losses import adversarial_loss
from compress_toolbox.distillation.methods import register_method
from compress_toolbox.distillation.methods.base import MethodContext
from compress_toolbox.distillation.methods.dafl import DAFL, DaflWeights


@dataclass(frozen=True)
class AdversarialWeights(DaflWeights):
    """DAFL's weights (a preset's ``dafl`` values apply here too) and the adversarial term's.
    The diversity term's weight, unless set, follows where the student starts
    (benchmarks/RESULTS.md): 1 for a student from the teacher's weights (session 35, at equal
    iterations: the LeNets level or better, the digits MLP 9 points better), 0 for a fresh one
    (sessions 36-37: on the folded ResNets, whose students start fresh, level to worse, with a
    failed seed)."""

    adv: float = 1.0  # student-teacher discrepancy the generator seeks
    div: float | None = None  # diversity: samples spread over the teacher's features


@register_method
class AdversarialDAFL(DAFL):
    name = "adversarial"
    summary = "DAFL's losses plus adversarial exploration of student-teacher disagreement"
    loss_names = (*DAFL.loss_names, "adv")
    weights_type = AdversarialWeights
    weights: AdversarialWeights

    @classmethod
    def weights_for(cls, ctx: MethodContext) -> AdversarialWeights:
        weights = super().weights_for(ctx)
        if weights.div is not None:
            return weights
        return replace(weights, div=1.0 if ctx.student_from_teacher else 0.0)

    def note(self) -> str | None:
        if self.ctx.student_from_teacher or self.weights.div > 0:
            return None
        return "diversity term off: the student starts fresh"

    def loss_terms(self, x, logits, labels) -> dict[str, tuple[float, torch.Tensor]]:
        terms = super().loss_terms(x, logits, labels)
        terms["adv"] = (self.weights.adv, adversarial_loss(self.student_logits(x), logits))
        return terms
