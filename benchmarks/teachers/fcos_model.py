"""A small torchvision FCOS (the detection benchmark's second teacher architecture): a strided
conv backbone with BatchNorm, torchvision's FeaturePyramidNetwork at strides 8 and 16, and
torchvision's own FCOSHead (GroupNorm towers, class logits, box regression, centre-ness).

``build_fcos`` gives the whole ``torchvision.models.detection.FCOS`` (trained with its own
losses, decoded with its own ``postprocess_detections``); ``RawFCOS`` wraps it the way
docs/detection.md tells a user to hand a torchvision detector over: its ``forward`` returns the
raw head, ``cls_logits`` (N, A, K), ``bbox_regression`` (N, A, 4), ``bbox_ctrness`` (N, A, 1).

    dafl-compress teacher.pt --model-class benchmarks/teachers/fcos_model.py:RawFCOS \\
        --input-shape 3,64,64 --task detection \\
        --decode benchmarks/teachers/fcos_model.py:decode_outputs
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork

IMAGE_SIZE = 64
MEAN, STD = 0.5, 0.25
# Anchor sizes (not strides) set which level learns an object: FCOS sends a location to the
# level whose [4, 8] x anchor size range holds its largest box distance, so 3 and 6 split the
# benchmark's 12-30 px objects between the two levels (torchvision's own strides would send
# every object to the first).
ANCHOR_SIZES = ((3,), (6,))
CENTRE_RADIUS = 4.0  # in anchor sizes: +-12 px at stride 8, so every object has positives


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))  # fmt: skip


class TinyBackboneFPN(nn.Module):
    """Strided convs to strides 8 and 16, then torchvision's FPN: OrderedDict of two levels."""

    def __init__(self, channels: int = 3, width: int = 16, out_channels: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(channels, width, 2), _conv(width, 2 * width, 2),
                                  _conv(2 * width, 4 * width, 2))  # fmt: skip
        self.down = _conv(4 * width, 4 * width, 2)
        self.fpn = FeaturePyramidNetwork([4 * width, 4 * width], out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        c3 = self.stem(x)
        return self.fpn(OrderedDict([("0", c3), ("1", self.down(c3))]))


def build_fcos(num_classes: int = 10, width: int = 16) -> FCOS:
    """The whole torchvision FCOS at 64 px (no resizing), its head with two conv layers."""
    backbone = TinyBackboneFPN(width=width)
    anchors = AnchorGenerator(sizes=ANCHOR_SIZES, aspect_ratios=((1.0,),) * len(ANCHOR_SIZES))
    head = FCOSHead(backbone.out_channels, 1, num_classes, num_convs=2)
    return FCOS(backbone, num_classes, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE,
                image_mean=[MEAN] * 3, image_std=[STD] * 3, anchor_generator=anchors, head=head,
                center_sampling_radius=CENTRE_RADIUS, score_thresh=0.05)  # fmt: skip


class RawFCOS(nn.Module):
    """``build_fcos``'s detector returning its raw head on images in [0, 1]."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.detector = build_fcos(num_classes, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        det = self.detector
        out = det.head(list(det.backbone((x - MEAN) / STD).values()))
        return out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]


def decode(detector: FCOS, cls_logits: torch.Tensor, bbox_regression: torch.Tensor,
           bbox_ctrness: torch.Tensor) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """torchvision's own decoding and NMS of raw head outputs (a teacher's or a student's), as
    ``FCOS.forward`` does it in eval mode: what a user's code runs on ``student.onnx``."""
    n = cls_logits.shape[0]
    sides = [IMAGE_SIZE // 8, IMAGE_SIZE // 16]
    features = [torch.zeros(n, 1, s, s) for s in sides]
    size = (IMAGE_SIZE, IMAGE_SIZE)
    image_list = ImageList(torch.zeros(n, 3, *size), [size] * n)
    anchors = detector.anchor_generator(image_list, features)
    per_level = [s * s for s in sides]
    head = {"cls_logits": cls_logits, "bbox_regression": bbox_regression,
            "bbox_ctrness": bbox_ctrness}  # fmt: skip
    split = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
    split_anchors = [list(a.split(per_level)) for a in anchors]
    return detector.postprocess_detections(split, split_anchors, image_list.image_sizes)


@functools.lru_cache(maxsize=1)
def _decoding_detector() -> FCOS:
    return build_fcos().eval()


def decode_outputs(outputs: tuple[torch.Tensor, ...],
                   image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """``--decode fcos_model.py:decode_outputs``: ``decode`` by a fresh detector (its anchors,
    box coder and thresholds hold no learned weights, so it decodes any checkpoint's outputs)."""
    assert tuple(image_size) == (IMAGE_SIZE, IMAGE_SIZE), image_size
    return decode(_decoding_detector(), *outputs)
