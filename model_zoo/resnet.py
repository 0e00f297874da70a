"""CIFAR-style ResNets (He et al. 2016): 3x3 stride-1 stem, no max-pool."""

from __future__ import annotations

from torch import nn

from .registry import ZooCost, register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs with a (projected when needed) identity shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with four stages of widths 64, 128, 256, 512."""

    def __init__(
        self, blocks: tuple[int, int, int, int], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        layers: list[nn.Module] = []
        in_planes = 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model(
    task="classification", family="resnet", default_input=(3, 32, 32), default_num_classes=10,
    meta=ZooCost(params=11_173_962, macs=555_422_720),
)
def resnet18(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """CIFAR ResNet-18 (BasicBlocks 2-2-2-2)."""
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels)


@register_model(
    task="classification", family="resnet", default_input=(3, 32, 32), default_num_classes=10,
    meta=ZooCost(params=21_282_122, macs=1_159_402_496),
)
def resnet34(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """CIFAR ResNet-34 (BasicBlocks 3-4-6-3)."""
    return CifarResNet((3, 4, 6, 3), num_classes, in_channels)
