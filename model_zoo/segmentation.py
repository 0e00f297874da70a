"""Semantic segmentation models returning a plain (N, K, H, W) logits tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v3_small
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import (
    deeplabv3_mobilenet_v3_large as tv_deeplabv3_mobilenet_v3_large,
)
from torchvision.models.segmentation import lraspp_mobilenet_v3_large as tv_lraspp
from torchvision.models.segmentation.lraspp import LRASPP

from ._utils import replace_first_conv
from .registry import ZooCost, register_model

_DEFAULT_INPUT = (3, 128, 128)
_DEFAULT_CLASSES = 21  # Pascal VOC


def _segmentation_model(family: str, params: int, macs: int):
    """``register_model`` for a segmentation family, with the zoo's default input and classes
    and the model's cost there."""
    return register_model(task="segmentation", family=family, default_input=_DEFAULT_INPUT,
                          default_num_classes=_DEFAULT_CLASSES,
                          meta=ZooCost(params=params, macs=macs))  # fmt: skip


class OutputOnly(nn.Module):
    """Wraps a torchvision segmentation model so ``forward`` returns ``model(x)["out"]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class _Up(nn.Module):
    """2x transposed-conv upsampling, concatenation with the skip, double conv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        self.conv = _double_conv(2 * out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dh or dw:  # odd input sizes: pad the upsampled map back to the skip's size
            x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """A small U-Net with ``len(widths)`` levels; output has the input's height and width."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128)
    ) -> None:
        super().__init__()
        self.downs = nn.ModuleList()
        channels = in_channels
        for w in widths:
            self.downs.append(_double_conv(channels, w))
            channels = w
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(
            _Up(widths[i + 1], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.downs):
            if i:
                x = self.pool(x)
            x = down(x)
            skips.append(x)
        for up, skip in zip(self.ups, reversed(skips[:-1])):
            x = up(x, skip)
        return self.head(x)


@_segmentation_model("lraspp", params=3_221_538, macs=124_944_768)
def lraspp_mobilenet_v3_large(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """torchvision LR-ASPP with a MobileNetV3-Large backbone (random weights)."""
    model = tv_lraspp(weights=None, weights_backbone=None, num_classes=num_classes)
    return OutputOnly(replace_first_conv(model, in_channels))


@_segmentation_model("lraspp", params=1_077_954, macs=40_169_984)
def lraspp_mobilenet_v3_small(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """LR-ASPP on a dilated MobileNetV3-Small backbone (random weights), as torchvision builds
    the Large one: low-level features at stride 8, high-level at 16; a student for it."""
    backbone = mobilenet_v3_small(weights=None, dilated=True).features
    stages = [0] + [i for i, b in enumerate(backbone) if getattr(b, "_is_cn", False)]
    stages.append(len(backbone) - 1)
    low, high = stages[-4], stages[-1]  # the output strides 8 and 16, as torchvision picks
    body = IntermediateLayerGetter(backbone, return_layers={str(low): "low", str(high): "high"})
    model = LRASPP(body, backbone[low].out_channels, backbone[high].out_channels, num_classes)
    return OutputOnly(replace_first_conv(model, in_channels))


@_segmentation_model("deeplabv3", params=11_025_477, macs=615_766_400)
def deeplabv3_mobilenet_v3_large(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """torchvision DeepLabV3 with a MobileNetV3-Large backbone (random weights, no aux head).

    Its ASPP pooling branch has a BatchNorm on a 1x1 map, so training needs batches > 1.
    """
    model = tv_deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
    )
    return OutputOnly(replace_first_conv(model, in_channels))


@_segmentation_model("unet", params=483_077, macs=585_105_408)
def unet_small(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """U-Net, 4 levels of widths 16-32-64-128."""
    return UNet(num_classes, in_channels, (16, 32, 64, 128))


@_segmentation_model("unet", params=121_357, macs=149_422_080)
def unet_tiny(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """Half-width ``unet_small`` (8-16-32-64): a natural student for it (~1/4 of its MACs)."""
    return UNet(num_classes, in_channels, (8, 16, 32, 64))


@_segmentation_model("unet", params=30_641, macs=38_928_384)
def unet_micro(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """Half-width ``unet_tiny`` (4-8-16-32): ~1/4 of its MACs, and ~0.29 of an LR-ASPP
    MobileNetV3-Large's at 64x64 (9.3 M against 32.1 M MACs), the zoo's closest to 1/4 there."""
    return UNet(num_classes, in_channels, (4, 8, 16, 32))
