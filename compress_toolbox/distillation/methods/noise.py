"""The DAFL paper's baseline: knowledge distillation on random inputs, no generator."""

from __future__ import annotations

import torch

from compress_toolbox.distillation.methods import register_method
from compress_toolbox.distillation.methods.base import GeneratedBatch, Method


@register_method
class NoiseKD(Method):
    name = "noise"
    summary = "KD on random inputs (the paper's Gaussian-noise baseline)"

    def sample(self, n: int) -> torch.Tensor:
        shape = (n, *self.ctx.input_shape)
        if self.ctx.preset.generator_output == "paper":  # N(0, 1), as in the paper
            return torch.randn(shape, device=self.ctx.device)
        return self.ctx.domain.to_model(torch.rand(shape, device=self.ctx.device))

    @torch.no_grad()
    def generate(self, batch_size: int) -> GeneratedBatch:
        x = self.sample(batch_size)
        with self.ctx.autocast():
            logits = self.ctx.teacher(x).float()
        return GeneratedBatch(x, logits, {})
