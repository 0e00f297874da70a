"""DAFL (Chen et al., ICCV 2019): a generator whose images the teacher answers confidently
(one-hot loss), with strong features (activation loss) and balanced classes (information
entropy). With the paper presets this is the paper's method exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from compress_toolbox.distillation.distributed import global_mean
from compress_toolbox.distillation.losses import (
    activation_loss,
    bounded_activation_loss,
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
class DaflWeights(LossWeights):
    """DAFL's loss weights: the paper's MNIST recipe (the CIFAR one: oh 0.05, a 0.01)."""

    oh: float = 1.0  # one-hot: the teacher answers confidently
    ie: float = 5.0  # information entropy: balanced classes
    a: float = 0.1  # activation: strong features before the teacher's last layer
    entropy_base: float = 10.0  # of the information entropy (the authors' code: log10)
    bounded_activation: bool = False  # scale-free, bounded activation loss (losses.py)
    div: float = 0.0  # diversity: the samples spread in the teacher's features (uniformity)


@register_method
class DAFL(GeneratorMethod):
    name = "dafl"
    summary = "DAFL: one-hot, activation and information-entropy losses (Chen et al. 2019)"
    loss_names = ("oh", "ie", "a", "div")
    weights_type = DaflWeights
    weights: DaflWeights

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.activation_reference: float | None = None
        self.spread = SampleSpread(ctx.device)
        self.features = final_layer_hook(
            ctx, {"activation": self.weights.a, "diversity": self.weights.div})

    def _activation(self, features: torch.Tensor) -> torch.Tensor:
        if not self.weights.bounded_activation:
            return activation_loss(features)
        if self.activation_reference is None:
            level = global_mean(features.detach().abs().flatten())  # the same on every rank
            self.activation_reference = float(level) or 1.0
        return bounded_activation_loss(features, self.activation_reference)

    def loss_terms(self, x, logits, labels) -> dict[str, tuple[float, torch.Tensor]]:
        weights = self.weights
        return {
            "oh": (weights.oh, one_hot_loss(logits)),
            "ie": (weights.ie, information_entropy_loss(logits, weights.entropy_base)),
            **self.feature_terms(),
        }

    def feature_terms(self) -> dict[str, tuple[float, torch.Tensor]]:
        """The terms on the teacher's features of the batch it just ran: activation, diversity."""
        if self.features is None:
            return {}
        features = self.features.pop().float()
        weights, terms = self.weights, {}
        if weights.a > 0:
            terms["a"] = (weights.a, self._activation(features))
        if weights.div > 0:
            terms["div"] = (weights.div, self.spread.loss(features))
        return terms

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "activation_reference": self.activation_reference,
            **self.spread.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.activation_reference = state.get("activation_reference")
        self.spread.load_state_dict(state)

    def close(self) -> None:
        if self.features is not None:
            self.features.close()
