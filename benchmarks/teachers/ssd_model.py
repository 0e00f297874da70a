"""A small torchvision SSD (the detection benchmark's third teacher architecture): the FCOS
teacher's strided conv backbone and FPN at strides 8 and 16 (fcos_model.py), torchvision's
``DefaultBoxGenerator`` anchors and its own ``SSDHead``, whose class logits are a softmax over a
background column and the classes: what ``--head ssd`` reads.

``build_ssd`` gives the whole ``torchvision.models.detection.ssd.SSD`` (trained with its own
losses, hard negative mining included, decoded with its own ``postprocess_detections``);
``RawSSD`` wraps it the way docs/detection.md tells a user to hand a torchvision detector over:
its ``forward`` returns the raw head, ``bbox_regression`` (N, A, 4) and ``cls_logits``
(N, A, K + 1), background first.

    dafl-compress teacher.pt --model-class benchmarks/teachers/ssd_model.py:RawSSD \\
        --input-shape 3,64,64 --task detection --head ssd \\
        --decode benchmarks/teachers/ssd_model.py:decode_outputs
"""

from __future__ import annotations

import functools

import torch
from fcos_model import IMAGE_SIZE, MEAN, STD, TinyBackboneFPN
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD, SSDHead

# Default boxes of 0.2 to 0.5 of the image at the two levels (about 13 to 32 px at 64 px: the
# benchmark's 12-30 px objects), square and 2:1 both ways: 4 per location.
SCALES = [0.2, 0.35, 0.5]
ASPECT_RATIOS = [[2], [2]]
SIDES = (IMAGE_SIZE // 8, IMAGE_SIZE // 16)


def build_ssd(num_classes: int = 10, width: int = 16) -> SSD:
    """The whole torchvision SSD at 64 px for ``num_classes`` classes (plus its background)."""
    backbone = TinyBackboneFPN(width=width)
    anchors = DefaultBoxGenerator(ASPECT_RATIOS, scales=SCALES)
    head = SSDHead([backbone.out_channels] * 2, anchors.num_anchors_per_location(),
                   num_classes + 1)  # fmt: skip
    return SSD(backbone, anchors, (IMAGE_SIZE, IMAGE_SIZE), num_classes + 1,
               image_mean=[MEAN] * 3, image_std=[STD] * 3, head=head, score_thresh=0.05)


class RawSSD(nn.Module):
    """``build_ssd``'s detector returning its raw head on images in [0, 1]."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.detector = build_ssd(num_classes, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        det = self.detector
        out = det.head(list(det.backbone((x - MEAN) / STD).values()))
        return out["bbox_regression"], out["cls_logits"]


def decode(detector: SSD, bbox_regression: torch.Tensor,
           cls_logits: torch.Tensor) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """torchvision's own decoding and NMS of raw head outputs (a teacher's or a student's), as
    ``SSD.forward`` does it in eval mode, with labels 0..K-1 (torchvision's 1..K, background
    0, shifted): what a user's code runs on ``student.onnx``."""
    n = cls_logits.shape[0]
    features = [torch.zeros(n, 1, s, s) for s in SIDES]
    size = (IMAGE_SIZE, IMAGE_SIZE)
    image_list = ImageList(torch.zeros(n, 3, *size), [size] * n)
    anchors = detector.anchor_generator(image_list, features)
    head = {"bbox_regression": bbox_regression, "cls_logits": cls_logits}
    found = detector.postprocess_detections(head, anchors, image_list.image_sizes)
    return [{**f, "labels": f["labels"] - 1} for f in found]


@functools.lru_cache(maxsize=1)
def _decoding_detector() -> SSD:
    return build_ssd().eval()


def decode_outputs(outputs: tuple[torch.Tensor, ...],
                   image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """``--decode ssd_model.py:decode_outputs``: ``decode`` by a fresh detector (its anchors,
    box coder and thresholds hold no learned weights, so it decodes any checkpoint's outputs)."""
    assert tuple(image_size) == (IMAGE_SIZE, IMAGE_SIZE), image_size
    return decode(_decoding_detector(), *outputs)
