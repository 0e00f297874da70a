"""A tiny torchvision FCOS returning its raw head, as docs/detection.md tells users to hand a
torchvision detector over (``--model-class tests/tv_fcos.py:RawTinyFCOS``): BatchNorm in the
backbone, torchvision's FPN (its upsampling reads the lateral's size) and FCOSHead (GroupNorm
towers shared by both levels)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FeaturePyramidNetwork


class _Backbone(nn.Module):
    def __init__(self, width: int = 8, out_channels: int = 64) -> None:
        super().__init__()

        def conv(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False),
                                 nn.BatchNorm2d(c_out), nn.ReLU())  # fmt: skip

        self.stem = nn.Sequential(conv(3, width), conv(width, 2 * width),
                                  conv(2 * width, 4 * width))  # fmt: skip
        self.down = conv(4 * width, 4 * width)
        self.fpn = FeaturePyramidNetwork([4 * width, 4 * width], out_channels)

    def forward(self, x: torch.Tensor) -> OrderedDict:
        c3 = self.stem(x)
        return self.fpn(OrderedDict([("0", c3), ("1", self.down(c3))]))


class RawTinyFCOS(nn.Module):
    """(cls_logits (N, A, K), bbox_regression (N, A, 4), bbox_ctrness (N, A, 1))."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.backbone = _Backbone()
        self.head = FCOSHead(64, 1, num_classes, num_convs=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.head(list(self.backbone(x).values()))
        return out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]


def decode(outputs: tuple[torch.Tensor, ...], image_size: tuple[int, int]) -> list[dict]:
    """A user's decoding of ``RawTinyFCOS``'s raw outputs (``--decode tv_fcos.py:decode``), as
    torchvision's FCOS does it: one anchor per location at strides 8 and 16, of the stride's
    size, boxes as left/top/right/bottom distances in anchor sizes, the class score times the
    centre-ness, class-wise NMS."""
    from torchvision.ops import batched_nms

    cls_logits, regression, ctrness = outputs
    height, width = image_size
    centres, sizes = [], []
    for stride in (8, 16):
        ys, xs = torch.meshgrid(torch.arange(height // stride), torch.arange(width // stride),
                                indexing="ij")  # fmt: skip
        centres.append(torch.stack([xs, ys], -1).reshape(-1, 2) * stride + stride / 2)
        sizes.append(torch.full((centres[-1].shape[0], 1), float(stride)))
    centre, size = torch.cat(centres), torch.cat(sizes)
    found = []
    for logits, values, quality in zip(cls_logits, regression, ctrness):
        boxes = torch.cat([centre - values[:, :2] * size, centre + values[:, 2:] * size], -1)
        scores, labels = (torch.sigmoid(logits) * torch.sigmoid(quality)).sqrt().max(-1)
        keep = scores > 0.05
        kept = batched_nms(boxes[keep], scores[keep], labels[keep], 0.6)[:100]
        found.append({"boxes": boxes[keep][kept], "scores": scores[keep][kept],
                      "labels": labels[keep][kept]})  # fmt: skip
    return found


def broken_decode(outputs: tuple[torch.Tensor, ...], image_size: tuple[int, int]) -> list:
    """A decoding that answers in the wrong form: boxes without scores."""
    return [{"boxes": torch.zeros(1, 4)} for _ in outputs[0]]
