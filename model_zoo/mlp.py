"""HintonNet MLPs from the DAFL paper's MNIST experiments (Hinton et al. 2015)."""

from __future__ import annotations

from torch import nn

from ._utils import hw
from .registry import CostRule, ZooCost, register_model


class HintonMLP(nn.Module):
    """Flatten -> Linear(hidden) -> ReLU -> Linear(hidden) -> ReLU -> Linear(num_classes)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: tuple[int, int] = (28, 28),
        hidden: int = 1200,
    ) -> None:
        super().__init__()
        height, width = input_size
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * height * width, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


def mlp_cost(hidden: int) -> CostRule:
    """The exact cost rule of a ``HintonMLP`` of ``hidden`` units (``register_model``'s cost)."""

    def cost(*, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> ZooCost:
        features = in_channels * input_size[0] * input_size[1]
        macs = features * hidden + hidden * hidden + hidden * num_classes
        return ZooCost(params=macs + 2 * hidden + num_classes, macs=macs)

    return cost


@register_model(
    task="classification", family="mlp", default_input=(1, 28, 28), default_num_classes=10,
    cost=mlp_cost(1200),
)
def hinton_mlp(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """HintonNet teacher: 1200-1200 hidden units."""
    return HintonMLP(num_classes, in_channels, hw(input_size, (28, 28)), hidden=1200)


@register_model(
    task="classification", family="mlp", default_input=(1, 28, 28), default_num_classes=10,
    cost=mlp_cost(800),
)
def hinton_mlp_half(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """HintonNet student: 800-800 hidden units."""
    return HintonMLP(num_classes, in_channels, hw(input_size, (28, 28)), hidden=800)
