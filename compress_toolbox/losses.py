"""DAFL's losses (Chen et al. 2019, eqs. 2-5 and the authors' code)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def one_hot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """L_oh: cross-entropy of the teacher's logits against their own argmax (pseudo labels)."""
    return F.cross_entropy(teacher_logits, teacher_logits.argmax(dim=1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """L_a: -mean |features| of the teacher's last hidden layer (input of its final layer)."""
    return -features.abs().mean()


def information_entropy_loss(teacher_logits: torch.Tensor, base: float = math.e) -> torch.Tensor:
    """L_ie = -H_info(mean_i softmax(y_T^i)): minimised when generated classes are balanced.

    The authors' code uses ``log10`` (``base=10``), which divides the entropy by ln 10.
    """
    mean_prob = F.softmax(teacher_logits.float(), dim=1).mean(dim=0)
    return (mean_prob * torch.log(mean_prob.clamp_min(1e-12))).sum() / math.log(base)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) summed over classes, mean over the batch,
    times T**2 (Hinton et al.'s scaling, so gradients keep their size as T changes).

    At T=1 this is the authors' ``kdloss``: ``kl_div(log_softmax(s), softmax(t), sum) / N``.
    """
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=1),
        F.softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean",
    ) * (t * t)
