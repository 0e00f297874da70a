"""Detection: a YOLO-style head's raw output (heads.py), distilled as it is so that the
student is a drop-in replacement (signature.py); mAP by COCOeval on --eval-data (data.py,
evaluation.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError, VerificationFailed
from compress_toolbox.tasks import register_task
from compress_toolbox.tasks.base import Task, TaskScores
from compress_toolbox.tasks.detection import evaluation, signature
from compress_toolbox.tasks.detection.data import DetectionEvalData, load_detection_data
from compress_toolbox.tasks.detection.decode import DETECTION_THRESHOLD
from compress_toolbox.tasks.detection.heads import HeadLayout, recognise
from compress_toolbox.tasks.detection.loss import detection_kd_loss

LAYOUTS_TEXT = "one output (N, 4 + K, A) (YOLOv8/v11) or (N, A, 5 + K) (YOLOv5)"


def layout_of(out: torch.Tensor) -> HeadLayout:
    """The head layout of a raw output tensor (batch first); DaflError when none fits."""
    layout = recognise(tuple(out.shape[1:]))
    if layout is None:
        raise DaflError(f"detection output {tuple(out.shape)} fits no head layout; "
                        f"--task detection reads {LAYOUTS_TEXT}")  # fmt: skip
    return layout


def _outputs_seen(teacher) -> tuple[str, int]:
    """The teacher's outputs as 'name (N, ...)' (from the file for an ONNX teacher, whose
    import keeps the first output only) and how many there are."""
    if teacher.format == "onnx":
        outputs = signature.signature(teacher.source, tuple(teacher.input_shape)).outputs
        shapes = [(spec.name, spec.at_probe[1:]) for spec in outputs]
    else:
        with torch.no_grad():
            out = teacher.module.eval()(torch.zeros(1, *teacher.input_shape))
        values = list(out.values()) if isinstance(out, dict) else out
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        shapes = [(f"output {i}", tuple(v.shape[1:]) if isinstance(v, torch.Tensor) else ())
                  for i, v in enumerate(values)]  # fmt: skip
    text = ", ".join(f"{name} (N, {', '.join(map(str, shape))})" for name, shape in shapes)
    return text, len(shapes)


@dataclass(frozen=True)
class Detection(Task):
    """YOLO-style raw head outputs; eval data as an .npz of images, boxes and labels."""

    @staticmethod
    def layout_of(out: torch.Tensor) -> HeadLayout:
        """The head layout of a raw output (methods read detection heads through it)."""
        return layout_of(out)

    def fits(self, output_shape: tuple[int, ...]) -> bool:
        return recognise(tuple(output_shape)) is not None

    def check_teacher(self, teacher) -> None:
        seen, count = _outputs_seen(teacher)
        if count != 1 or not self.fits(teacher.analysis.output_shape):
            raise DaflError(f"{teacher.source}: outputs {seen} fit no detection head layout; "
                            f"--task detection reads {LAYOUTS_TEXT}")  # fmt: skip

    def output_shape(self, num_outputs: int,
                     input_shape: tuple[int, ...]) -> tuple[int, ...] | None:  # fmt: skip
        """Unknown from the classes alone (the locations depend on the head): None, so the
        zoo checks no shape (its torchvision detectors return lists of boxes)."""
        return None

    def check_output(self, teacher: nn.Module, shape: tuple[int, ...], device) -> int:
        with torch.no_grad():
            out = teacher(torch.rand(2, *shape, device=device))
        if not isinstance(out, torch.Tensor):
            raise DaflError(f"teacher output is {type(out).__name__}; --task detection reads "
                            f"{LAYOUTS_TEXT}")  # fmt: skip
        layout = layout_of(out)
        if not torch.isfinite(out).all():
            raise DaflError("the teacher's output is NaN or infinite on random inputs")
        return layout.num_classes

    def distillation_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                          temperature: float) -> torch.Tensor:  # fmt: skip
        return detection_kd_loss(student_out, teacher_out, layout_of(teacher_out))

    def auto_method(self, batchnorm_layers: int) -> tuple[str, str] | None:
        return "dafl-det", (
            "DAFL adapted per location (one-hot on the teacher's confident locations, class "
            "balance over them, activation loss): the one data-free method for detection heads "
            "so far"
        )

    def health_logits(self, teacher_out: torch.Tensor, student_out: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Class logits at the teacher's confident locations (its best one per image at least)."""
        layout = layout_of(teacher_out)
        confidence = layout.confidence(teacher_out)
        keep = confidence >= DETECTION_THRESHOLD
        keep[torch.arange(len(keep)), confidence.argmax(1)] = True
        logit = lambda out: torch.logit(layout.class_scores(out)[keep].clamp(1e-4, 1 - 1e-4))  # noqa: E731
        return logit(teacher_out), logit(student_out)

    def measure(self, teacher: nn.Module, student_onnx: Path, data, sampler) -> TaskScores | None:
        if data is None and sampler is None:
            return None
        probe = data.x[:1] if data is not None else sampler(1)
        layout = layout_of(evaluation.torch_outputs(teacher, probe))
        if isinstance(data, DetectionEvalData):
            return evaluation.measure_on_data(teacher, student_onnx, data, layout)
        return evaluation.measure_fidelity(teacher, student_onnx, sampler, layout)

    def finish_export(self, student_onnx: Path, teacher) -> dict[str, Any] | None:
        """student.onnx given the teacher file's input and output names; its signature then
        compared with the teacher's (a difference fails the run)."""
        if teacher.format != "onnx":
            return None
        shape = tuple(teacher.input_shape)
        wanted = signature.signature(teacher.source, shape)
        signature.adopt_names(student_onnx, wanted)
        # the student takes any batch: probed at the teacher's (1 for a batch-1 export)
        got = signature.signature(student_onnx, shape, batch=wanted.inputs[0].at_probe[0])
        problems = signature.compare(got, wanted)
        if problems:
            raise VerificationFailed(f"student.onnx does not have the teacher's signature: "
                            f"{'; '.join(problems)}")  # fmt: skip
        return {"signature": got.as_dict(), "same_as_teacher": True}

    def classes_of(self, output_shape: tuple[int, ...]) -> int:
        layout = recognise(tuple(output_shape))
        return layout.num_classes if layout else 0

    def load_eval_data(self, path: Path, input_shape: tuple[int, ...], domain: InputDomain,
                       num_classes: int | None) -> DetectionEvalData:  # fmt: skip
        return load_detection_data(path, input_shape, domain, num_classes)

    def plot_samples(self, sampler, teacher: nn.Module, student: nn.Module,
                     domain: InputDomain, path: Path) -> None:  # fmt: skip
        from compress_toolbox.tasks.detection.pictures import plot_detections  # matplotlib

        plot_detections(sampler, teacher, student, domain, path)


# Batch 16 and the segmentation task's augmentations (moves, flips, photometric jitter): a
# detector too reads every location of a canvas, and generated scenes should not keep their
# objects in the same places.
DETECTION = register_task(
    Detection(
        "detection",
        2,
        LAYOUTS_TEXT,
        batch_size=16,
        health_samples=32,
        monitor_samples=0,  # mAP needs decoding and COCOeval: measured once, at the end
        generated_augmentations=("shift_and_flip", "photometric"),
        one_class_per_input=False,
        figure="mAP@0.5",
    )  # fmt: skip
)
