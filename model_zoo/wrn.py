"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016): WRN-depth-k, pre-activation blocks."""

from __future__ import annotations

from torch import nn

from .registry import ZooCost, register_model


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with a 1x1 projection shortcut when shapes change."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: 3 groups of (depth-4)/6 blocks, widths 16k, 32k, 64k."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = widths[0]
        for g, planes in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBasic(in_planes, planes, 2 if g > 0 and j == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model(
    task="classification", family="wrn", default_input=(3, 32, 32), default_num_classes=10,
    meta=ZooCost(params=691_674, macs=101_106_944),
)
def wrn_16_2(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """WRN-16-2."""
    return WideResNet(16, 2, num_classes, in_channels)


@register_model(
    task="classification", family="wrn", default_input=(3, 32, 32), default_num_classes=10,
    meta=ZooCost(params=2_243_546, macs=327_599_360),
)
def wrn_40_2(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """WRN-40-2."""
    return WideResNet(40, 2, num_classes, in_channels)
