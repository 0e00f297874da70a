"""Multi-object scenes for the student: pieces of generated images (what the teacher sees in
them) resized and pasted on plain noisy canvases, one to three per canvas, at several scales.

A generator's images are objects everywhere, edge to edge; the scenes users' detectors and
segmenters meet hold a few objects on a background. The student also learns from such scenes,
labelled by the teacher (as DIODE's tiles and Multi-Object Impressions compose several objects
per canvas). Used by ``dafl-det`` (pieces cut to the teacher's boxes) and ``dafl-seg`` (pieces
cut to the teacher's non-background pixels, pasted with their mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress_toolbox.distillation.methods.base import GeneratedBatch

SCENE_OBJECTS = (1, 3)  # pieces per canvas
SCENE_SCALES = (0.175, 0.42)  # a pasted piece's longest side / the canvas's shorter side


def plain_canvases(like: torch.Tensor, pixels: bool) -> torch.Tensor:
    """Plain noisy canvases shaped like ``like``: a random dark grey in pixels, else the
    batch's per-channel mean (inputs in the paper's standardised space)."""
    n, c = like.shape[:2]
    if pixels:
        level = torch.rand(n, c, 1, 1, device=like.device) * 0.4
        return (level + 0.05 * torch.randn_like(like)).clamp(0, 1)
    mean = like.mean((0, 2, 3), keepdim=True)
    return mean + 0.1 * like.std() * torch.randn_like(like)


def _scaled(piece: torch.Tensor, longest: int, mode: str = "bilinear") -> torch.Tensor:
    """``piece`` (C, h, w) resized so that its longest side is ``longest``, aspect kept."""
    h, w = piece.shape[-2:]
    size = [max(2, round(longest * side / max(h, w))) for side in (h, w)]
    options = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(piece[None], size=size, mode=mode, **options)[0]


def compose_scenes(pieces: list[torch.Tensor], like: torch.Tensor, pixels: bool,
                   masks: list[torch.Tensor] | None = None,
                   scales: tuple[float, float] = SCENE_SCALES) -> torch.Tensor:  # fmt: skip
    """Canvases shaped like ``like`` (N, C, H, W), each holding 1-3 of ``pieces`` (N tensors
    (C, h, w)) resized, their longest side ``scales`` of the canvas's shorter side, and pasted
    at random places (``pixels``: the pieces are pixels in [0, 1]). With ``masks`` ((h, w)
    bool, one per piece) only a piece's masked pixels are pasted: the object without what
    surrounded it."""
    canvas = plain_canvases(like, pixels)
    n, _, height, width = like.shape
    for i in range(n):
        count = int(torch.randint(SCENE_OBJECTS[0], SCENE_OBJECTS[1] + 1, ()))
        # canvas i holds piece i first: every piece is in some canvas (the caller may keep
        # only some canvases)
        for source in [i, *torch.randint(n, (count - 1,)).tolist()]:
            scale = float(torch.empty(()).uniform_(*scales))
            longest = max(2, round(min(height, width) * scale))
            patch = _scaled(pieces[source], longest)
            h, w = patch.shape[-2:]
            y, x = int(torch.randint(height - h + 1, ())), int(torch.randint(width - w + 1, ()))
            region = canvas[i, :, y : y + h, x : x + w]
            if masks is None:
                region.copy_(patch)
            else:
                keep = _scaled(masks[source][None].float(), longest, mode="nearest") > 0.5
                region.copy_(torch.where(keep, patch, region))
    return canvas


class SceneBatches:
    """A generator method's student batches made in part (``scene_share``) of multi-object
    scenes: each ``generate`` runs the method's own generator step, composes scenes of the
    pieces ``scene_pieces`` cuts from the generated images, and has the teacher label them. Put
    before the method in the bases (``class DAFLDetection(SceneBatches, DAFL)``)."""

    scene_share: float = 0.5  # of each student batch
    scene_scales: tuple[float, float] = SCENE_SCALES  # see compose_scenes

    def scene_pieces(self, images: torch.Tensor, teacher_out: torch.Tensor
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:  # fmt: skip
        """What the teacher sees in each of ``images`` (N, C, H, W; pixels where the generator
        makes pixels): N pieces (C, h, w), and their masks (h, w) or None (whole pieces)."""
        raise NotImplementedError

    def generate(self, batch_size: int) -> GeneratedBatch:
        """The method's generator step; then the batch's last ``scene_share`` replaced by
        scenes of its pieces, with the teacher's answers on them."""
        batch = super().generate(batch_size)
        scenes = round(batch_size * self.scene_share)
        if scenes == 0 or len(self.ctx.input_shape) != 3:
            return batch
        domain = self.pixel_domain
        images = domain.to_pixels(batch.x) if domain is not None else batch.x
        pieces, masks = self.scene_pieces(images, batch.teacher_logits)
        composed = compose_scenes(pieces, images, pixels=domain is not None, masks=masks,
                                  scales=self.scene_scales)  # fmt: skip
        composed = domain.to_model(composed) if domain is not None else composed
        with torch.no_grad(), self.ctx.autocast():
            logits = self.ctx.teacher(composed[:scenes]).float()
        keep = batch_size - scenes
        return GeneratedBatch(torch.cat([batch.x[:keep], composed[:scenes]]),
                              torch.cat([batch.teacher_logits[:keep], logits]),
                              batch.losses)  # fmt: skip
