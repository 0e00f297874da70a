"""DFAD (Fang et al. 2019, arXiv 1912.11006): adversarial data-free distillation, which the
paper applies to semantic segmentation. The generator maximises the student-teacher discrepancy
(mean absolute difference of the logits, per pixel for a segmentation teacher) and the student
minimises its KD loss on the same inputs; DAFL's information-entropy term keeps the generated
inputs spread over the teacher's classes (the collapse guard watches that)."""

from __future__ import annotations

import torch

from compress_toolbox.distillation.losses import information_entropy_loss, logit_discrepancy
from compress_toolbox.distillation.methods import register_method
from compress_toolbox.distillation.methods.base import GeneratorMethod


@register_method
class DFAD(GeneratorMethod):
    name = "dfad"
    summary = "DFAD: generator maximises the (pixel-wise) student-teacher discrepancy"
    loss_names = ("adv", "ie")

    def loss_terms(self, x, logits, labels) -> dict[str, tuple[float, torch.Tensor]]:
        preset = self.ctx.preset
        return {
            "adv": (preset.w_adv, -logit_discrepancy(self.student_logits(x), logits)),
            "ie": (preset.w_ie, information_entropy_loss(logits, preset.entropy_base)),
        }
