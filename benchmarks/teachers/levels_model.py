"""The decoding of the per-level detection benchmark's teacher (``bench_detection.py
--head levels``): a YOLOv5-layout TinyYolo shipped as its raw levels, (N, 1, h, w, 5 + K) at
strides 8 and 16, as YOLOv5/v7 exports without their grid give them. This is the user's own
decoding that ``--decode`` hands the tool:

    dafl-compress teacher.onnx --task detection --eval-data scenes.npz \\
        --decode benchmarks/teachers/levels_model.py:decode_outputs
"""

from __future__ import annotations

import torch

from compress_toolbox.tasks.detection.decode import decode
from compress_toolbox.tasks.detection.heads import HeadLayout
from compress_toolbox.tasks.detection.tiny_model import rows_of_levels


def decode_outputs(outputs: tuple[torch.Tensor, ...],
                   image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """The levels decoded into boxes in pixels and sigmoid scores (``rows_of_levels``), then
    the built-in threshold and class-wise NMS of a YOLOv5 output."""
    rows = rows_of_levels(outputs, tuple(image_size))
    layout = HeadLayout("yolov5", rows.shape[-1] - 5)
    return [{"boxes": d.boxes, "scores": d.scores, "labels": d.labels}
            for d in decode(rows, layout)]  # fmt: skip
