"""torchvision object detectors (random weights).

In eval mode they take a list (or batch) of (C, H, W) images and return one dict per image
with ``boxes``, ``labels`` and ``scores``; their transforms resize inputs internally, so
``input_size`` is accepted but not used. They give decoded detections, never a raw head: asked
for one (``head``, as for the student of a YOLO teacher) they refuse; ``yolo.py``'s give it.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import (
    fasterrcnn_mobilenet_v3_large_320_fpn as tv_fasterrcnn_mobilenet_v3_large_320_fpn,
)
from torchvision.models.detection import (
    ssdlite320_mobilenet_v3_large as tv_ssdlite320_mobilenet_v3_large,
)

from ._utils import replace_first_conv
from .registry import CostRule, ZooCost, register_model

_DEFAULT_INPUT = (3, 320, 320)
_DEFAULT_CLASSES = 91  # COCO, background included


def _fixed(meta: ZooCost) -> CostRule:
    """A cost rule for torchvision detectors: they resize every image to 320 px themselves."""
    return lambda **_: meta


def _no_raw_head(head: str | None) -> None:
    if head is not None:
        raise ValueError(f"gives decoded detections (lists of boxes), not a raw {head} head")


def _adapt_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """New stem conv for ``in_channels`` and per-channel normalisation of matching length."""
    if in_channels == 3:
        return model
    replace_first_conv(model, in_channels)
    transform = model.transform
    transform.image_mean = [sum(transform.image_mean) / 3] * in_channels
    transform.image_std = [sum(transform.image_std) / 3] * in_channels
    return model


@register_model(
    task="detection",
    family="ssdlite",
    default_input=_DEFAULT_INPUT,
    default_num_classes=_DEFAULT_CLASSES,
    cost=_fixed(ZooCost(params=3_440_060, macs=583_171_904)),
)
def ssdlite320_mobilenet_v3_large(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None,
    head: str | None = None, locations: int | None = None,
) -> nn.Module:
    """SSDLite (320x320) with a MobileNetV3-Large backbone."""
    _no_raw_head(head)
    model = tv_ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    return _adapt_channels(model, in_channels)


@register_model(
    task="detection",
    family="fasterrcnn",
    default_input=_DEFAULT_INPUT,
    default_num_classes=_DEFAULT_CLASSES,
    cost=_fixed(ZooCost(params=19_410_754, macs=733_357_952)),
)
def fasterrcnn_mobilenet_v3_large_320_fpn(
    *, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None,
    head: str | None = None, locations: int | None = None,
) -> nn.Module:
    """Faster R-CNN with a MobileNetV3-Large FPN backbone, low-resolution (320) setting."""
    _no_raw_head(head)
    model = tv_fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    return _adapt_channels(model, in_channels)
