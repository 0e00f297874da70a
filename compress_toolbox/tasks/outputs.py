"""How a model's output is seen by every task: per-sample logits (``as_samples``), the main
tensor of a dict or tuple output (``MainOutput``), or all of them joined (``JoinedOutputs``,
a detection head's boxes and scores), and the activations a teacher's file ends in,
taken off for distillation and given back to the shipped student (``FILE_OUTPUTS``)."""

from __future__ import annotations

import torch
from torch import nn


def as_samples(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) logits as they are; (N, K, *spatial) logits as (N * prod(spatial), K): one
    sample per pixel."""
    if logits.dim() <= 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def labels_as_samples(labels: torch.Tensor) -> torch.Tensor:
    """Class indices matching ``as_samples``: (N,) as they are, (N, *spatial) flattened."""
    return labels.reshape(-1)


class MainOutput(nn.Module):
    """A model whose output is a dict (torchvision's segmentation models: ``{"out": ...,
    "aux": ...}``), list or tuple, made to return its main tensor (``out``, else the first)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, dict):
            out = out["out"] if "out" in out else next(iter(out.values()))
        while isinstance(out, (list, tuple)):
            out = out[0]
        return out


class JoinedOutputs(nn.Module):
    """A model returning several (N, A, C_i) tensors (a tuple, list or dict: a detection
    head's boxes and scores) made to return them joined along the last axis, (N, A, sum C_i),
    in their order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(tensors_of(self.model(x)).values()), dim=-1)


def tensors_of(out) -> dict[str, torch.Tensor]:
    """A model's tensors by name: a dict's keys, ``output0``, ``output1``, ... for a tuple or
    list, ``output0`` for a lone tensor."""
    if isinstance(out, dict):
        return dict(out)
    if isinstance(out, (list, tuple)):
        return {f"output{i}": value for i, value in enumerate(out)}
    return {"output0": out}


def joinable(shapes: list[tuple[int, ...]]) -> bool:
    """Whether outputs of these shapes (batch first) can be joined along their last axis:
    two or more, each (N, A, C) with the same N and A."""
    return len(shapes) > 1 and all(len(s) == 3 and s[:2] == shapes[0][:2] for s in shapes)


class Softmaxed(nn.Module):
    """A logits model given back the Softmax its file ended in (over ``dim``): what the
    student is exported as when the teacher's file outputs probabilities, so that
    ``student.onnx`` answers like the teacher's file."""

    def __init__(self, model: nn.Module, dim: int = 1) -> None:
        super().__init__()
        self.model, self.dim = model, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=self.dim)


class SigmoidAsTwoClasses(nn.Module):
    """A model whose file ends in a one-channel Sigmoid (a binary map or classifier), cut
    before it, seen as two classes: logits (-z/2, z/2), whose softmax is (1 - p, p) with
    p = sigmoid(z), so the teacher is distilled and scored as a 2-class one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.model(x) / 2
        return torch.cat([-half, half], dim=1)


class SigmoidMap(nn.Module):
    """A 2-class logits model answering as a one-channel Sigmoid file does: p(class 1)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)[:, 1:2]


# how the teacher's file answers -> the student as it is shipped (``distilled_output`` values)
FILE_OUTPUTS = {
    "logits before its Softmax": Softmaxed,
    "the logit before its Sigmoid, as two classes": SigmoidMap,
}
