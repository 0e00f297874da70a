"""Losses of data-free distillation: DAFL's (Chen et al. 2019, eqs. 2-5 and the authors' code),
the BatchNorm-statistics prior (DeepInversion, Yin et al. 2020), adversarial exploration
(DFAD/ZSKT, Fang et al. 2019 / Micaelli & Storkey 2019) and the student's KD loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compress_toolbox.distillation.distributed import global_mean, global_moments
from compress_toolbox.tasks.outputs import as_samples


def one_hot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """L_oh: cross-entropy of the teacher's logits against their own argmax (pseudo labels)."""
    logits = as_samples(teacher_logits)
    return F.cross_entropy(logits, logits.argmax(dim=1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """L_a: -mean |features| of the teacher's last hidden layer (input of its final layer)."""
    return -features.abs().mean()


def bounded_activation_loss(features: torch.Tensor, reference: float) -> torch.Tensor:
    """L_a made scale-free and bounded: -a / (a + reference) in (-1, 0] for a = mean |features|.

    ``reference`` is the teacher's activation level on the first generated batch: the loss
    rewards strong features as DAFL's does, but its pull fades once they are several times the
    reference, so the generator cannot win by saturating the teacher (unbounded -mean|f| grew
    from -7 to -15 on a residual teacher while every generated image became one class).
    """
    level = global_mean(features.abs().flatten()).squeeze()  # over every rank's batch
    return -level / (level + reference)


def information_entropy_loss(teacher_logits: torch.Tensor, base: float = math.e) -> torch.Tensor:
    """L_ie = -H_info(mean_i softmax(y_T^i)): minimised when generated classes are balanced.

    The authors' code uses ``log10`` (``base=10``), which divides the entropy by ln 10.
    """
    # over every pixel of every rank's batch
    mean_prob = global_mean(F.softmax(as_samples(teacher_logits).float(), dim=1))
    return (mean_prob * torch.log(mean_prob.clamp_min(1e-12))).sum() / math.log(base)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) summed over classes, mean over the batch,
    times T**2 (Hinton et al.'s scaling, so gradients keep their size as T changes).

    At T=1 this is the authors' ``kdloss``: ``kl_div(log_softmax(s), softmax(t), sum) / N``.
    """
    t = temperature
    student_logits, teacher_logits = as_samples(student_logits), as_samples(teacher_logits)
    return F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=1),
        F.softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean",
    ) * (t * t)


def adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Minus the student-teacher KL divergence, on the samples where both agree on the class.

    Minimising it drives the generator to inputs the student has not yet learnt (DFAD, ZSKT);
    the agreement mask (as in Fast-DFKD, Fang et al. 2022) keeps it from rewarding inputs whose
    class the teacher itself flips, which would turn the samples into adversarial noise.
    """
    student_logits, teacher_logits = as_samples(student_logits), as_samples(teacher_logits)
    # the teacher's log-probabilities, not its probabilities: a confident teacher's softmax
    # holds exact zeros, where the gradient of p log p (the generator's, through the teacher)
    # is infinite and turned the generator to NaN
    per_sample = F.kl_div(
        F.log_softmax(student_logits.float(), dim=1),
        F.log_softmax(teacher_logits.float(), dim=1),
        reduction="none",
        log_target=True,
    ).sum(1)
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(per_sample * agree).mean()


def logit_discrepancy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DFAD's discrepancy (Fang et al. 2019): mean absolute difference of the logits, over
    classes and samples (pixels). The generator maximises it, the student minimises its KD."""
    return (as_samples(student_logits).float() - as_samples(teacher_logits).float()).abs().mean()


class BatchNormStatistics:
    """DeepInversion's prior: the batch statistics at every BatchNorm layer of the teacher should
    match the running mean and variance it recorded on its training data.

    Hooks every ``nn.BatchNorm1d/2d`` of ``module``; after a forward pass, ``loss()`` is the
    sum over layers of ||mu_batch - running_mean||_2 + ||var_batch - running_var||_2 (the
    authors' form) and clears what was recorded. ``close()`` removes the hooks.
    """

    def __init__(self, module: nn.Module) -> None:
        self.layers = [
            layer
            for layer in module.modules()
            if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d))
            and layer.running_mean is not None
        ]
        self._terms: list[torch.Tensor] = []
        self._handles = [layer.register_forward_pre_hook(self._record) for layer in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def _record(self, layer: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        if not torch.is_grad_enabled():
            return
        dims = [0] + list(range(2, x.dim()))
        mean, var, _ = global_moments(x.float(), dims)  # over every rank's batch
        self._terms.append(
            torch.linalg.vector_norm(mean - layer.running_mean, 2)
            + torch.linalg.vector_norm(var - layer.running_var, 2)
        )

    def loss(self) -> torch.Tensor | None:
        """Mean over the recorded layers (None when nothing was recorded), then reset."""
        terms, self._terms = self._terms, []
        return torch.stack(terms).mean() if terms else None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
