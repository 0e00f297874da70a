"""The BatchNorm-statistics prior (DeepInversion, Yin et al. 2020; generative as in Fast-DFKD,
Fang et al. 2022): a class-conditional generator whose images make every BatchNorm layer of the
teacher see the mean and variance it recorded on its training data, plus adversarial
exploration. Available when the teacher still has its BatchNorm layers (TorchScript, .pt2,
checkpoints, ONNX exported without folding); torch's default ONNX export folds them away.

For a segmentation teacher (as DFSS, 2025, guides sampling with BatchNorm statistics) the
generator is unconditional, since one class per image means nothing when every pixel has one:
the BatchNorm prior, plus DAFL's per-pixel one-hot and information-entropy terms (scenes the
teacher segments confidently, covering every class) and pixel-wise adversarial exploration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from compress_toolbox.distillation.losses import (
    BatchNormStatistics,
    adversarial_loss,
    information_entropy_loss,
    one_hot_loss,
)
from compress_toolbox.distillation.methods import LossWeights, register_method
from compress_toolbox.distillation.methods.base import (
    GeneratorMethod,
    MethodContext,
    SampleSpread,
    final_layer_hook,
)


@dataclass(frozen=True)
class BnPriorWeights(LossWeights):
    """The BatchNorm prior's loss weights (oh, ie: unconditional, for segmentation)."""

    ce: float = 1.0  # cross-entropy to the drawn labels
    bn: float = 5.0  # BatchNorm statistics (mean over the BatchNorm layers)
    adv: float = 1.0  # adversarial exploration (0: none)
    oh: float = 1.0  # DAFL's one-hot loss
    ie: float = 5.0  # DAFL's information entropy
    entropy_base: float = 10.0  # of the information entropy
    div: float = 0.0  # diversity: samples spread over the teacher's features (as DAFL's)


@register_method
class BatchNormPrior(GeneratorMethod):
    name = "bn-prior"
    summary = "BatchNorm-statistics prior + class-conditional generator + adversarial"
    loss_names = ("ce", "bn", "adv", "div")
    conditional = True
    weights_type = BnPriorWeights
    weights: BnPriorWeights

    def __init__(self, ctx: MethodContext) -> None:
        self.statistics = BatchNormStatistics(ctx.teacher)
        self.conditional = ctx.task.one_class_per_input  # see the module's docstring
        if not self.conditional:
            self.loss_names = ("oh", "ie", "bn", "adv", "div")
        super().__init__(ctx)
        self.spread = SampleSpread(ctx.device)
        self.features = final_layer_hook(ctx, {"diversity": self.weights.div})

    @classmethod
    def unavailable_reason(cls, ctx: MethodContext) -> str | None:
        if ctx.batchnorm_layers() == 0:
            return (
                "the teacher has no BatchNorm layers (torch's default ONNX export folds them "
                "into the convolutions; a .pt2, TorchScript or checkpoint file keeps them)"
            )
        return None

    def loss_terms(self, x, logits, labels) -> dict[str, tuple[float, torch.Tensor]]:
        weights = self.weights
        if labels is not None:
            terms = {"ce": (weights.ce, F.cross_entropy(logits, labels))}
        else:
            terms = {
                "oh": (weights.oh, one_hot_loss(logits)),
                "ie": (weights.ie, information_entropy_loss(logits, weights.entropy_base)),
            }
        terms["bn"] = (weights.bn, self.statistics.loss())
        if weights.adv > 0:
            terms["adv"] = (weights.adv, adversarial_loss(self.student_logits(x), logits))
        if self.features is not None:
            terms["div"] = (weights.div, self.spread.loss(self.features.pop().float()))
        return terms

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.spread.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.spread.load_state_dict(state)

    def close(self) -> None:
        self.statistics.close()
        if self.features is not None:
            self.features.close()
