"""How many images run at once outside the training steps (health checks, evaluation).

On a CPU a large image's activations outgrow the caches, and per image a larger batch then
runs slower, not faster: PicoDet at 800 x 608 took 116 ms an image at batch 1 and 488 ms at
batch 16, and a health check of 32 such images 13.8 s at once against 4.2 s two at a time
(benchmarks/RESULTS.md). So these passes run about a million pixels at a time. The generator
is not run in parts: its BatchNorm normalises over the whole sample."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

PIXELS_PER_BATCH = 1 << 20


def batch_for(sample_shape: Sequence[int], most: int) -> int:
    """Samples of ``sample_shape`` to run at once: ``most``, fewer for large images (C, H, W),
    at least one. Other samples (a vector, a signal) count as one pixel each."""
    pixels = sample_shape[-2] * sample_shape[-1] if len(sample_shape) == 3 else 1
    return max(1, min(most, PIXELS_PER_BATCH // max(pixels, 1)))


@torch.no_grad()
def run_in_batches(module: nn.Module, x: torch.Tensor, most: int) -> torch.Tensor:
    """``module``'s outputs for every sample of ``x``, ``batch_for`` of them at a time."""
    parts = x.split(batch_for(x.shape[1:], most)) if len(x) else [x]
    return torch.cat([module(part) for part in parts])
