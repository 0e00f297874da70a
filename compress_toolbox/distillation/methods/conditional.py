"""A class-conditional generator: each sample gets a class drawn so that every batch is
balanced, and the generator learns inputs the teacher assigns to that class (cross-entropy),
plus adversarial exploration. Needs nothing from the teacher but its answers, so it suits
teachers whose BatchNorm layers were folded away (torch's default ONNX export)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress_toolbox.distillation.losses import adversarial_loss
from compress_toolbox.distillation.methods import register_method
from compress_toolbox.distillation.methods.base import GeneratorMethod, MethodContext


@register_method
class Conditional(GeneratorMethod):
    name = "conditional"
    summary = "class-conditional generator (balanced labels, cross-entropy) + adversarial"
    loss_names = ("ce", "adv")
    conditional = True

    @classmethod
    def unavailable_reason(cls, ctx: MethodContext) -> str | None:
        if not ctx.task.one_class_per_input:
            return (
                "it draws one class per generated image, whereas a segmentation teacher labels "
                "every pixel; use dafl, dfad, adversarial or bn-prior"
            )
        return None

    def loss_terms(self, x, logits, labels) -> dict[str, tuple[float, torch.Tensor]]:
        preset = self.ctx.preset
        terms = {"ce": (preset.w_ce, F.cross_entropy(logits, labels))}
        if preset.w_adv > 0:
            terms["adv"] = (preset.w_adv, adversarial_loss(self.student_logits(x), logits))
        return terms
