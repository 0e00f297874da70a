"""Model zoo: a torchvision-style registry of teacher and student architectures.

>>> from model_zoo import get_model, list_models
>>> model = get_model("lenet5_half", num_classes=10, in_channels=1, input_size=(32, 32))
"""

from . import detection, lenet, mlp, mobilenet, resnet, segmentation, vgg, wrn, yolo  # noqa: F401
from .registry import ZooCost, ZooEntry, get_entry, get_model, list_models, register_model
from .student import pick_student

__all__ = [
    "ZooCost",
    "ZooEntry",
    "get_entry",
    "get_model",
    "list_models",
    "pick_student",
    "register_model",
]
