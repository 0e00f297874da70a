"""LeNet-5 (LeCun et al. 1998) as used by the DAFL paper, and its half-width student."""

from __future__ import annotations

from torch import nn

from ._utils import hw
from .registry import CostRule, ZooCost, register_model


def _features(height: int, width: int) -> tuple[int, int]:
    """(H, W) of the feature map LeNet-5 flattens; ValueError below 14x14."""
    feat_h, feat_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
    if feat_h < 1 or feat_w < 1:
        raise ValueError(f"LeNet-5 needs inputs of at least 14x14, got {height}x{width}")
    return feat_h, feat_w


class LeNet5(nn.Module):
    """conv(5x5) -> relu -> maxpool2 -> conv(5x5) -> relu -> maxpool2 -> fc -> fc -> fc."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: tuple[int, int] = (32, 32),
        widths: tuple[int, int, int, int] = (6, 16, 120, 84),
    ) -> None:
        super().__init__()
        c1, c2, f1, f2 = widths
        feat_h, feat_w = _features(*input_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * feat_h * feat_w, f1),
            nn.ReLU(inplace=True),
            nn.Linear(f1, f2),
            nn.ReLU(inplace=True),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def lenet_cost(widths: tuple[int, int, int, int]) -> CostRule:
    """The exact cost rule of a LeNet-5 of these widths (``register_model``'s ``cost``)."""
    c1, c2, f1, f2 = widths

    def cost(*, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> ZooCost:
        height, width = input_size
        feat_h, feat_w = _features(height, width)
        flat = c2 * feat_h * feat_w
        conv1 = (height - 4) * (width - 4) * c1 * in_channels * 25
        conv2 = ((height - 4) // 2 - 4) * ((width - 4) // 2 - 4) * c2 * c1 * 25
        weights = (in_channels * 25 * c1 + c1 * 25 * c2 + flat * f1 + f1 * f2 + f2 * num_classes)
        return ZooCost(params=weights + c1 + c2 + f1 + f2 + num_classes,
                       macs=conv1 + conv2 + flat * f1 + f1 * f2 + f2 * num_classes)  # fmt: skip

    return cost


@register_model(
    task="classification", family="lenet", default_input=(1, 32, 32), default_num_classes=10,
    cost=lenet_cost((6, 16, 120, 84)),
)
def lenet5(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """LeNet-5: widths 6, 16, 120, 84."""
    return LeNet5(num_classes, in_channels, hw(input_size, (32, 32)), (6, 16, 120, 84))


@register_model(
    task="classification", family="lenet", default_input=(1, 32, 32), default_num_classes=10,
    cost=lenet_cost((3, 8, 60, 42)),
)
def lenet5_half(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """LeNet-5-Half (DAFL student): widths 3, 8, 60, 42."""
    return LeNet5(num_classes, in_channels, hw(input_size, (32, 32)), (3, 8, 60, 42))
