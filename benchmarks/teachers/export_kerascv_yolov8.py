"""Save KerasCV's YOLOV8Detector (architecture only, untrained) as a KerasCV user holds it: a
``.keras`` file of the detector with the extra-small backbone's sizes (``yolo_v8_xs_backbone``:
channels 16-128, one FPN block), 20 classes as KerasCV's PASCAL VOC tutorial trains, 320 px.
Its call gives the raw head: ``boxes`` (N, 2100, 64), distributions over 16 distances per side,
and ``classes`` (N, 2100, 20) through their sigmoid; decoding and NMS run only in ``predict``.
Run with keras_cv installed (bench_real_exports.py runs it in its own virtual environment):

    python export_kerascv_yolov8.py OUT.keras
"""

from __future__ import annotations

import sys

import keras_cv


def main(out: str) -> None:
    backbone = keras_cv.models.YOLOV8Backbone(
        stackwise_channels=[16, 32, 64, 128], stackwise_depth=[1, 2, 2, 1],
        include_rescaling=True, activation="swish", input_shape=(320, 320, 3))  # fmt: skip
    detector = keras_cv.models.YOLOV8Detector(num_classes=20, bounding_box_format="xyxy",
                                              backbone=backbone, fpn_depth=1)  # fmt: skip
    detector.save(out)


if __name__ == "__main__":
    main(sys.argv[1])
