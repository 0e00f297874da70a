"""A class-conditional generator: each sample gets a class drawn so that every batch is
balanced, and the generator learns inputs the teacher assigns to that class (cross-entropy),
plus adversarial exploration. Needs nothing from the teacher but its answers, so it suits
teachers whose BatchNorm layers were folded away (torch's default ONNX export)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress_toolbox.distillation.losses import adversarial_loss
from compress_toolbox.distillation.methods import LossWeights, register_method
from compress_toolbox.distillation.methods.base import GeneratorMethod, MethodContext


@dataclass(frozen=True)
class ConditionalWeights(LossWeights):
    """The class-conditional generator's loss weights."""

    ce: float = 1.0  # cross-entropy to the drawn labels
    adv: float = 1.0  # adversarial exploration (0: none)


@register_method
class Conditional(GeneratorMethod):
    name = "conditional"
    summary = "class-conditional generator (balanced labels, cross-entropy) + adversarial"
    loss_names = ("ce", "adv")
    conditional = True
    weights_type = ConditionalWeights
    weights: ConditionalWeights

    @classmethod
    def unavailable_reason(cls, ctx: MethodContext) -> str | None:
        if not ctx.task.one_class_per_input:
            return (
                "it draws one class per generated image, whereas a segmentation teacher labels "
                "every pixel; use dafl, dfad, adversarial or bn-prior"
            )
        return None

    def loss_terms(self, x, logits, labels) -> dict[str, tuple[float, torch.Tensor]]:
        weights = self.weights
        terms = {"ce": (weights.ce, F.cross_entropy(logits, labels))}
        if weights.adv > 0:
            terms["adv"] = (weights.adv, adversarial_loss(self.student_logits(x), logits))
        return terms
