"""Architectures of the benchmark teacher suite (built here, trained by make_suite.py).

Each family stands for a kind of network users bring: LeNet-5 (the DAFL paper's), a CIFAR-style
ResNet with BatchNorm and residual adds, a VGG-style BN net, a MobileNetV3-style net (depthwise
convs, hardswish, squeeze-excite), and an MLP. ``normalize=(mean, std)`` puts the input
normalisation inside the model (the user then gives no --mean/--std).
"""

from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std inside the model, for teachers that take raw [0, 1] pixels."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x):
        return (x - self.mean) / self.std


def _maybe_normalize(normalize: tuple[float, float] | None) -> nn.Module:
    return Normalize(*normalize) if normalize else nn.Identity()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-6n+2 (He et al. 2016, CIFAR): blocks=(3,3,3) is ResNet-20, (1,1,1) ResNet-8."""

    def __init__(self, blocks=(3, 3, 3), widths=(16, 32, 64), in_channels: int = 1,
                 num_classes: int = 10, normalize=None) -> None:  # fmt: skip
        super().__init__()
        self.normalize = _maybe_normalize(normalize)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        layers, cin = [], widths[0]
        for stage, (count, width) in enumerate(zip(blocks, widths)):
            for index in range(count):
                layers.append(BasicBlock(cin, width, 2 if stage > 0 and index == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(self.normalize(x)))
        return self.fc(x.mean((2, 3)))


class VGGSmall(nn.Module):
    """conv-BN-ReLU x2, pool, x2, pool, x1, pool, then two Linear layers."""

    def __init__(self, widths=(16, 32, 64), in_channels: int = 3, num_classes: int = 10,
                 input_size: int = 32, normalize=None) -> None:  # fmt: skip
        super().__init__()
        self.normalize = _maybe_normalize(normalize)

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU()]  # fmt: skip

        a, b, c = widths
        self.features = nn.Sequential(
            *block(in_channels, a), *block(a, a), nn.MaxPool2d(2),
            *block(a, b), *block(b, b), nn.MaxPool2d(2),
            *block(b, c), nn.MaxPool2d(2),
        )  # fmt: skip
        side = input_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(self.normalize(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        scale = x.mean((2, 3), keepdim=True)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(scale))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand, depthwise kxk, optional SE, 1x1 project, residual."""

    def __init__(self, cin, hidden, cout, kernel, stride, se: bool, act) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != cin:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()]
        layers += [nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden,
                             bias=False), nn.BatchNorm2d(hidden), act()]  # fmt: skip
        if se:
            layers.append(SqueezeExcite(hidden, max(8, hidden // 4)))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetSmall(nn.Module):
    """A MobileNetV3-small-like net for 32x32 inputs (depthwise, hardswish, squeeze-excite)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, normalize=None) -> None:
        super().__init__()
        hs, re = nn.Hardswish, nn.ReLU
        self.normalize = _maybe_normalize(normalize)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(16), hs())  # fmt: skip
        config = [  # cin, hidden, cout, kernel, stride, se, act
            (16, 16, 16, 3, 2, True, re),
            (16, 64, 24, 3, 2, False, re),
            (24, 72, 24, 3, 1, False, re),
            (24, 96, 40, 5, 2, True, hs),
            (40, 120, 40, 5, 1, True, hs),
        ]
        self.blocks = nn.Sequential(*(InvertedResidual(*row) for row in config))
        self.head = nn.Sequential(nn.Conv2d(40, 160, 1, bias=False), nn.BatchNorm2d(160), hs())
        self.classifier = nn.Sequential(nn.Linear(160, 128), hs(), nn.Linear(128, num_classes))

    def forward(self, x):
        x = self.head(self.blocks(self.stem(self.normalize(x))))
        return self.classifier(x.mean((2, 3)))


class MLP(nn.Module):
    """features -> 256 -> 128 -> classes (ReLU), for flat inputs such as 8x8 digits."""

    def __init__(self, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, 256), nn.ReLU(), nn.Linear(256, 128),
                                 nn.ReLU(), nn.Linear(128, num_classes))  # fmt: skip

    def forward(self, x):
        return self.net(x)
