"""Export ultralytics' YOLOv8n (architecture only, untrained) as Rockchip's ``rknn_model_zoo``
exports YOLOv8 for its NPUs: the ``Detect`` head returns, level by level, the box
distributions (N, 64, h, w), the class scores through their sigmoid (N, K, h, w) and their sum
clipped to [0, 1] (N, 1, h, w); legacy exporter, opset 12, batch 1, 320 px. Run with
ultralytics installed (bench_real_exports.py runs it in its own virtual environment):

    python export_yolov8_rknn.py OUT.onnx
"""

from __future__ import annotations

import sys
import types

import torch
from ultralytics import YOLO


def rknn_forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rockchip's form of ``Detect.forward``: no DFL, no decoding, three parts per level."""
    parts = []
    for level in range(self.nl):
        scores = torch.sigmoid(self.cv3[level](x[level]))
        parts += [self.cv2[level](x[level]), scores, scores.sum(1, keepdim=True).clamp(0, 1)]
    return parts


def main(out: str) -> None:
    model = YOLO("yolov8n.yaml").model.eval()
    head = model.model[-1]
    head.forward = types.MethodType(rknn_forward, head)
    names = [f"{part}{level}" for level in range(head.nl) for part in ("box", "cls", "sum")]
    torch.onnx.export(model, (torch.rand(1, 3, 320, 320),), out, dynamo=False, opset_version=12,
                      input_names=["images"], output_names=names)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
