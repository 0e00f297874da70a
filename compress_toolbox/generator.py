"""DAFL's generator (Chen et al. 2019 and the authors' code), for any teacher input shape."""

from __future__ import annotations

import math

import torch
from torch import nn


class ImageGenerator(nn.Module):
    """latent -> Linear -> (width, ceil(H/4), ceil(W/4)) -> BN -> up x2 -> conv -> BN -> LReLU
    -> up x2 -> conv(width/2) -> BN -> LReLU -> conv(C) -> tanh -> BN(C, affine=False).

    The output is cropped (centre) to the teacher's exact H x W when H or W is not a multiple
    of 4. ``bn_eps=0.8`` reproduces the authors' ``nn.BatchNorm2d(128, 0.8)`` (a large eps they
    passed positionally; we keep it because their hyper-parameters were tuned with it).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        latent_dim: int = 100,
        width: int = 128,
        bn_eps: float = 0.8,
    ) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.h0, self.w0 = math.ceil(height / 4), math.ceil(width_px / 4)
        self.width = width
        half = max(width // 2, 1)
        self.fc = nn.Linear(latent_dim, width * self.h0 * self.w0)
        self.bn0 = nn.BatchNorm2d(width)
        self.block1 = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width, eps=bn_eps),
            nn.LeakyReLU(0.2),
        )
        self.block2 = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, half, 3, padding=1),
            nn.BatchNorm2d(half, eps=bn_eps),
            nn.LeakyReLU(0.2),
        )
        self.out_conv = nn.Conv2d(half, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], self.width, self.h0, self.w0)
        x = self.block2(self.block1(self.bn0(x)))
        x = self.out_conv(x)
        _, height, width = self.input_shape
        if x.shape[-2:] != (height, width):  # 4*ceil(H/4) >= H: centre crop to the exact size
            top = (x.shape[-2] - height) // 2
            left = (x.shape[-1] - width) // 2
            x = x[..., top : top + height, left : left + width]
        return self.out_bn(torch.tanh(x))


class VectorGenerator(nn.Module):
    """MLP generator for flat (F,) teacher inputs: latent -> 2 hidden layers -> F -> BN."""

    def __init__(self, num_features: int, latent_dim: int = 100, width: int = 256) -> None:
        super().__init__()
        self.input_shape = (num_features,)
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim, width),
            nn.BatchNorm1d(width),
            nn.LeakyReLU(0.2),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.LeakyReLU(0.2),
            nn.Linear(width, num_features),
            nn.BatchNorm1d(num_features, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def make_generator(
    input_shape: tuple[int, ...], latent_dim: int = 100, width: int = 128
) -> nn.Module:
    """A generator producing batches shaped like the teacher's input: (C,H,W) images or (F,)."""
    if len(input_shape) == 3:
        return ImageGenerator(tuple(input_shape), latent_dim, width)
    if len(input_shape) == 1:
        return VectorGenerator(input_shape[0], latent_dim, max(2 * width, 64))
    from .errors import DaflError

    raise DaflError(
        f"input shape {tuple(input_shape)} is not supported: DAFL needs (C, H, W) images or (F,)"
    )
