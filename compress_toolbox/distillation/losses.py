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


def spread_features(features: torch.Tensor) -> torch.Tensor:
    """(N, D) features on the unit sphere for ``uniformity_loss``: (N, C, H, W) maps averaged
    over their positions first (what is in an image, not where: also keeps D at C). Rows far
    shorter than the batch's typical row are scaled as if longer (the gradient of a plain
    normalisation grows as 1 / length)."""
    rows = features.float().flatten(2).mean(2) if features.dim() > 2 else features.float()
    lengths = rows.norm(dim=1, keepdim=True)
    floor = 1e-3 * lengths.detach().mean() + 1e-12
    return rows / lengths.clamp(min=floor)


def uniformity_loss(
    spread: torch.Tensor, earlier: torch.Tensor | None, temperature: float = 2.0
) -> torch.Tensor:
    """Diversity of generated samples in the teacher's feature space: the uniformity loss of
    Wang & Isola (2020) at their temperature 2, log of the mean of exp(-t ||f_i - f_j||^2) over
    pairs of features on the unit sphere (``spread``: ``spread_features`` of this batch), each
    sample against the others and against ``earlier`` ones (detached, from earlier batches or
    other ranks). Minimising it spreads the samples over the sphere rather than letting the
    generator repeat a few inputs per class (the aim of CMI's contrastive term, Fang et al.
    2021, without its second views). In [-4t, 0]."""
    others = spread if earlier is None else torch.cat([spread, earlier.to(spread)])
    with torch.autocast(spread.device.type, enabled=False):  # bf16 rounds near-copies to 0
        distances = (2 - 2 * spread.float() @ others.float().T).clamp_min(0)
    pairs = ~torch.eye(*distances.shape, dtype=torch.bool, device=distances.device)
    if not pairs.any():  # one sample, nothing earlier
        return distances.sum() * 0
    return torch.logsumexp(-temperature * distances[pairs], 0) - math.log(int(pairs.sum()))


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
