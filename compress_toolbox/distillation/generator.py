"""Generators of teacher inputs: DAFL's (Chen et al. 2019 and the authors' code), for any input
shape, optionally class-conditional and producing inputs in the teacher's input domain."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError


class _Output(nn.Module):
    """The generator's last step. ``domain=None``: the paper's tanh then BatchNorm(affine=False)
    (inputs standardised per channel, whatever the teacher expects); otherwise a sigmoid gives
    pixels in [0, 1], mapped into the teacher's input domain."""

    def __init__(self, channels: int, domain: InputDomain | None, dims: int) -> None:
        super().__init__()
        self.domain = domain
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.bn = bn(channels, affine=False) if domain is None else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.domain is None:
            return self.bn(torch.tanh(h))
        return self.domain.to_model(torch.sigmoid(h))


class _LatentInput(nn.Module):
    """z (and, when conditional, a one-hot class label appended to it)."""

    def __init__(self, latent_dim: int, num_classes: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = num_classes

    @property
    def size(self) -> int:
        return self.latent_dim + self.num_classes

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if not self.num_classes:
            return z
        if labels is None:
            raise ValueError("a class-conditional generator needs labels")
        return torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], dim=1)


class ImageGenerator(nn.Module):
    """latent -> Linear -> (width, ceil(H/4), ceil(W/4)) -> BN -> up x2 -> conv -> BN -> LReLU
    -> up x2 -> conv(width/2) -> BN -> LReLU -> conv(C) -> output (see ``_Output``).

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
        *,
        num_classes: int = 0,
        domain: InputDomain | None = None,
    ) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.h0, self.w0 = math.ceil(height / 4), math.ceil(width_px / 4)
        self.width = width
        half = max(width // 2, 1)
        self.latent = _LatentInput(latent_dim, num_classes)
        self.fc = nn.Linear(self.latent.size, width * self.h0 * self.w0)
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
        self.output = _Output(channels, domain, dims=2)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.fc(self.latent(z, labels)).view(z.shape[0], self.width, self.h0, self.w0)
        x = self.block2(self.block1(self.bn0(x)))
        x = self.out_conv(x)
        _, height, width = self.input_shape
        if x.shape[-2:] != (height, width):  # 4*ceil(H/4) >= H: centre crop to the exact size
            top = (x.shape[-2] - height) // 2
            left = (x.shape[-1] - width) // 2
            x = x[..., top : top + height, left : left + width]
        return self.output(x)


class VectorGenerator(nn.Module):
    """MLP generator for flat (F,) teacher inputs: latent -> 2 hidden layers -> F -> output."""

    def __init__(
        self,
        num_features: int,
        latent_dim: int = 100,
        width: int = 256,
        *,
        num_classes: int = 0,
        domain: InputDomain | None = None,
    ) -> None:
        super().__init__()
        self.input_shape = (num_features,)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.latent = _LatentInput(latent_dim, num_classes)
        self.net = nn.Sequential(
            nn.Linear(self.latent.size, width),
            nn.BatchNorm1d(width),
            nn.LeakyReLU(0.2),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.LeakyReLU(0.2),
            nn.Linear(width, num_features),
        )
        self.output = _Output(num_features, domain, dims=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.net(self.latent(z, labels)))


def make_generator(
    input_shape: tuple[int, ...],
    latent_dim: int = 100,
    width: int = 128,
    *,
    num_classes: int = 0,
    domain: InputDomain | None = None,
) -> nn.Module:
    """A generator producing batches shaped like the teacher's input: (C,H,W) images or (F,).

    ``num_classes`` > 0 makes it class-conditional (``forward(z, labels)``); ``domain`` makes
    it produce inputs in the teacher's input domain instead of the paper's standardised output.
    """
    options = {"num_classes": num_classes, "domain": domain}
    if len(input_shape) == 3:
        return ImageGenerator(tuple(input_shape), latent_dim, width, **options)
    if len(input_shape) == 1:
        return VectorGenerator(input_shape[0], latent_dim, max(2 * width, 64), **options)
    raise DaflError(
        f"input shape {tuple(input_shape)} is not supported: DAFL needs (C, H, W) images or (F,)"
    )


def _mirror_and_gather(x: torch.Tensor, row_index: torch.Tensor,
                       col_index: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``x`` (N, C, H, W) with output row r of image i taken from input row ``row_index[i, r]``
    (likewise columns), each image mirrored left-right with probability 1/2."""
    width = x.shape[3]
    mirror = torch.rand(x.shape[0], 1, device=x.device) < 0.5
    col_index = torch.where(mirror, width - 1 - col_index, col_index)
    x = x.gather(2, row_index[:, None, :, None].expand_as(x))
    return x.gather(3, col_index[:, None, None, :].expand_as(x))


def shift_and_flip(x: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) rolled by its own random offset (wrapping round) and
    mirrored left-right with probability 1/2; differentiable, so a generator learns through it.

    For segmentation teachers: a generator quickly settles on one layout (the same classes in
    the same places in every image), and a student trained on it learns classes by position;
    moving each generated scene elsewhere keeps the scenes but breaks that correlation
    (benchmarks/RESULTS.md, Segmentation).
    """
    n, _, height, width = x.shape
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    dy = torch.randint(height, (n, 1), device=x.device)
    dx = torch.randint(width, (n, 1), device=x.device)
    row_index = (rows - dy) % height  # (N, H): output row r takes input row r - dy
    col_index = (cols - dx) % width
    return _mirror_and_gather(x, row_index, col_index)


def crop_and_flip(x: torch.Tensor, fraction: float = 0.125) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) moved by its own random offset of up to ``fraction`` of
    its size (the edge pixels repeated into the gap) and mirrored left-right with probability
    1/2: the random crop and flip of classification training, differentiable.

    Unlike ``shift_and_flip`` nothing wraps round, so an object stays whole (for classifiers).
    """
    n, _, height, width = x.shape
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    reach_y, reach_x = max(1, int(height * fraction)), max(1, int(width * fraction))
    dy = torch.randint(-reach_y, reach_y + 1, (n, 1), device=x.device)
    dx = torch.randint(-reach_x, reach_x + 1, (n, 1), device=x.device)
    row_index = (rows - dy).clamp(0, height - 1)  # (N, H): output row r takes input row r - dy
    col_index = (cols - dx).clamp(0, width - 1)
    return _mirror_and_gather(x, row_index, col_index)


def jitter_photometric(x: torch.Tensor, domain: InputDomain | None) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W, in the teacher's input domain) with its own contrast
    (x0.4 to x1 about mid-grey), brightness (-0.3 to +0.3), a 3x3 blur with probability 1/2
    and Gaussian noise (sigma 0 to 0.1), in [0, 1] pixels, clipped; differentiable.
    ``domain=None`` (a generator whose output is not pixels, the paper's): ``x`` as it is.

    For segmentation teachers: a DAFL generator's images saturate to black and white
    (samples.png), and a student that never saw mid-tones, blur or noise misreads real scenes.
    The teacher labels the jittered images, so the labels stay the teacher's (measured in
    benchmarks/RESULTS.md, Segmentation session 7).
    """
    if domain is None:
        return x
    pixels = domain.to_pixels(x)
    n = pixels.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype)

    pixels = (pixels - 0.5) * uniform(0.4, 1.0) + 0.5 + uniform(-0.3, 0.3)
    blurred = F.avg_pool2d(pixels, 3, stride=1, padding=1, count_include_pad=False)
    pixels = torch.where(uniform(0.0, 1.0) < 0.5, blurred, pixels)
    pixels = pixels + uniform(0.0, 0.1) * torch.randn_like(pixels)
    return domain.to_model(pixels.clamp(0.0, 1.0))


# What a task may ask to be done to each generated image before the teacher sees it
# (tasks.Task.generated_augmentations), in that order. ``domain`` is the teacher's input
# domain, or None when the generator's output is not pixels.
AUGMENTATIONS: dict[str, Callable[[torch.Tensor, InputDomain | None], torch.Tensor]] = {
    "shift_and_flip": lambda x, domain: shift_and_flip(x),
    "crop_and_flip": lambda x, domain: crop_and_flip(x),
    "photometric": jitter_photometric,
}


def augment(x: torch.Tensor, names: tuple[str, ...], domain: InputDomain | None) -> torch.Tensor:
    """``x`` through the augmentations ``names`` (keys of ``AUGMENTATIONS``), in order."""
    for name in names:
        x = AUGMENTATIONS[name](x, domain)
    return x
