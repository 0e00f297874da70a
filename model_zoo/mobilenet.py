"""torchvision MobileNetV2 adapted to small inputs and arbitrary input channels."""

from __future__ import annotations

from dataclasses import replace

from torch import nn
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

from ._utils import hw, replace_first_conv
from .registry import ZooCost, register_model, scale_by_pixels

_META = ZooCost(params=2_236_682, macs=24_461_312)  # at (3, 32, 32), 10 classes


def _stem_stride(input_size: tuple[int, int]) -> int:
    return 1 if max(input_size) <= 64 else 2


def _cost(*, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> ZooCost:
    """MACs scaled by the pixels, a quarter of that with the stride-2 stem."""
    scaled = scale_by_pixels(_META, (32, 32), input_size)
    return replace(scaled, macs=scaled.macs // _stem_stride(input_size) ** 2)


@register_model(
    task="classification", family="mobilenet", default_input=(3, 32, 32), default_num_classes=10,
    meta=_META, cost=_cost,
)
def mobilenet_v2(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """MobileNetV2 (width 1.0); the stem conv has stride 1 for inputs of at most 64 px."""
    model = tv_mobilenet_v2(weights=None, num_classes=num_classes)
    stride = _stem_stride(hw(input_size, (32, 32)))
    return replace_first_conv(model, in_channels, stride=stride)
