"""DAFL for segmentation teachers, with scenes: the generator is DAFL's, per pixel; a quarter of
each student batch is multi-object scenes (distillation/scenes.py) made of what the teacher sees
in the generated images, the rest the images themselves.

Each generated image gives one piece: its pixels the teacher does not call background, cut to
their bounding box and pasted with their mask (the object without what surrounded it) on a plain
noisy canvas, 1-3 pieces per canvas, their longest side half the canvas to all of it; the
teacher labels the scene. The background is what the teacher answers most on plain canvases.
A generator's images hold classes edge to edge, where the scenes segmenters meet hold a few
objects on a background: without scenes the student never sees an object's edge against the
background at its many sizes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes

from compress_toolbox.distillation.methods import register_method
from compress_toolbox.distillation.methods.base import MethodContext
from compress_toolbox.distillation.methods.dafl import DAFL
from compress_toolbox.distillation.scenes import SceneBatches, plain_canvases

BACKGROUND_PROBES = 8  # plain canvases the teacher labels to tell its background class
MIN_OBJECT_PIXELS = 4  # fewer non-background pixels: the whole image is the piece


@register_method
class DAFLSegmentation(SceneBatches, DAFL):
    name = "dafl-seg"
    summary = ("DAFL per pixel; the student also learns on scenes of the teacher's objects pasted "
               "on plain canvases")  # fmt: skip
    # a quarter of each student batch, pieces half the canvas to all of it: the best of three
    # settings screened on the benchmark at 300 s (half the batch with detection's smaller
    # pieces, 17-42%, halved the student's mean IoU: small pieces teach background), then
    # measured at 600 s (benchmarks/RESULTS.md)
    scene_share = 0.25
    scene_scales = (0.5, 1.0)

    @classmethod
    def unavailable_reason(cls, ctx: MethodContext) -> str | None:
        if ctx.task.output_dims != 3 or len(ctx.input_shape) != 3:
            return "it reads per-pixel class maps of images only (--task segmentation)"
        return None

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.background: int | None = None

    def _background_class(self, like: torch.Tensor) -> int:
        """The class the teacher answers most on plain noisy canvases (asked once)."""
        if self.background is None:
            canvases = plain_canvases(like[:BACKGROUND_PROBES], self.pixel_domain is not None)
            if self.pixel_domain is not None:
                canvases = self.pixel_domain.to_model(canvases)
            with torch.no_grad(), self.ctx.autocast():
                answers = self.ctx.teacher(canvases).float().argmax(1)
            self.background = int(answers.flatten().mode().values)
        return self.background

    def scene_pieces(self, images: torch.Tensor, teacher_out: torch.Tensor
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
        """Each image cut to the bounding box of its non-background pixels, with their mask
        (a class map coarser than the image read at the image's size)."""
        objects = teacher_out.detach().argmax(1) != self._background_class(images)
        if objects.shape[-2:] != images.shape[-2:]:
            objects = F.interpolate(objects[:, None].float(), size=images.shape[-2:],
                                    mode="nearest")[:, 0] > 0.5  # fmt: skip
        pieces, masks = [], []
        for image, mask in zip(images, objects):
            if int(mask.sum()) < MIN_OBJECT_PIXELS:
                pieces.append(image)
                masks.append(torch.ones_like(mask))
                continue
            x0, y0, x1, y1 = masks_to_boxes(mask[None])[0].int().tolist()  # inclusive
            box = (slice(y0, y1 + 1), slice(x0, x1 + 1))
            pieces.append(image[:, box[0], box[1]])
            masks.append(mask[box])
        return pieces, masks

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "background": self.background}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.background = state.get("background")
