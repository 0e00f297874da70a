"""Detection as a task plug-in, one concern per module: head layouts (``heads``), decoding and
NMS (``decode``), mAP by COCOeval (``metrics``), evaluation data (``data``), measuring teacher
and student (``evaluation``), the distillation loss (``loss``), the drop-in signature
(``signature``), pictures (``pictures``), synthetic scenes and a reference detector for the
benchmark and tests (``scenes``, ``tiny_model``, ``training``). ``task`` registers it."""

from compress_toolbox.tasks.detection.task import DETECTION, Detection, layout_of

__all__ = ["DETECTION", "Detection", "layout_of"]
