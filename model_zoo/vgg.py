"""CIFAR-style VGG-11 with batch norm: conv stack, global average pool, one linear layer."""

from __future__ import annotations

from torch import nn

from .registry import ZooCost, register_model

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class CifarVGG(nn.Module):
    """VGG conv stack (ceil-mode pooling so inputs down to 1 px keep working) + linear head."""

    def __init__(self, cfg: tuple, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [
                    nn.Conv2d(channels, v, 3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model(
    task="classification", family="vgg", default_input=(3, 32, 32), default_num_classes=10,
    meta=ZooCost(params=9_228_362, macs=152_769_536),
)
def vgg11_bn(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """VGG-11-BN for CIFAR-size inputs."""
    return CifarVGG(_VGG11, num_classes, in_channels)
