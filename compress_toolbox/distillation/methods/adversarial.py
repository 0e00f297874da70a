"""DAFL plus adversarial exploration (DFAD, Fang et al. 2019; ZSKT, Micaelli & Storkey 2019):
the generator also seeks inputs where the student still disagrees with the teacher."""

from __future__ import annotations

import torch

from compress_toolbox.distillation.losses import adversarial_loss
from compress_toolbox.distillation.methods import register_method
from compress_toolbox.distillation.methods.dafl import DAFL


@register_method
class AdversarialDAFL(DAFL):
    name = "adversarial"
    summary = "DAFL's losses plus adversarial exploration of student-teacher disagreement"
    loss_names = ("oh", "ie", "a", "adv")

    def loss_terms(self, x, logits, labels) -> dict[str, tuple[float, torch.Tensor]]:
        terms = super().loss_terms(x, logits, labels)
        terms["adv"] = (self.ctx.preset.w_adv, adversarial_loss(self.student_logits(x), logits))
        return terms
