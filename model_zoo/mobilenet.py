"""torchvision MobileNetV2 adapted to small inputs and arbitrary input channels."""

from __future__ import annotations

from torch import nn
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

from ._utils import hw, replace_first_conv
from .registry import register_model


@register_model(
    task="classification", family="mobilenet", default_input=(3, 32, 32), default_num_classes=10
)
def mobilenet_v2(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """MobileNetV2 (width 1.0); the stem conv has stride 1 for inputs of at most 64 px."""
    height, width = hw(input_size, (32, 32))
    model = tv_mobilenet_v2(weights=None, num_classes=num_classes)
    stride = 1 if max(height, width) <= 64 else 2
    return replace_first_conv(model, in_channels, stride=stride)
