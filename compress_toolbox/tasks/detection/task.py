"""Detection: a detector's raw head output (heads.py: one YOLO output, or boxes and scores,
and a centre-ness, as outputs that the import joins), distilled as it is so that the student
is a drop-in replacement (split.py, export/signature.py); mAP by COCOeval on --eval-data (data.py,
evaluation.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchvision.ops import box_convert

from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError
from compress_toolbox.export.signature import signature
from compress_toolbox.tasks import register_task
from compress_toolbox.tasks.base import Task, TaskScores
from compress_toolbox.tasks.detection import evaluation, split
from compress_toolbox.tasks.detection.data import DetectionEvalData, load_detection_data
from compress_toolbox.tasks.detection.decode import DETECTION_THRESHOLD, Decoding
from compress_toolbox.tasks.detection.heads import (
    DFL_CHANNELS,
    HEAD_NAMES,
    LAYOUTS_TEXT,
    QUALITY,
    HeadLayout,
    describe_layouts,
    forced,
    joined_layout,
    recognise,
    with_pyramid,
)
from compress_toolbox.tasks.detection.loss import detection_kd_loss
from compress_toolbox.tasks.detection.user_decode import UserDecoder
from compress_toolbox.tasks.outputs import MainOutput, tensors_of

if TYPE_CHECKING:
    from compress_toolbox.load.teacher import Teacher

FIDELITY = "fidelity mAP@0.5 (detections against the float model's)"


def layout_of(out: torch.Tensor) -> HeadLayout:
    """The head layout of a single raw output tensor (batch first); DaflError when none fits."""
    layout = recognise(tuple(out.shape[1:]))
    if layout is None:
        raise DaflError(f"detection output {tuple(out.shape)} fits no head layout; "
                        f"{describe_layouts()}")  # fmt: skip
    return layout


def _outputs_seen(teacher) -> tuple[str, int]:
    """The teacher file's outputs as 'name (N, ...)' (from the file for an ONNX teacher, whose
    import keeps one output or joins them) and how many there are."""
    if teacher.format == "onnx":
        outputs = signature(teacher.source, tuple(teacher.input_shape)).outputs
        shapes = [(spec.name, spec.at_probe[1:]) for spec in outputs]
    else:
        with torch.no_grad():
            out = teacher.module.eval()(torch.zeros(1, *teacher.input_shape))
        shapes = [(name, tuple(v.shape[1:]) if isinstance(v, torch.Tensor) else ())
                  for name, v in tensors_of(out).items()]  # fmt: skip
    text = ", ".join(f"{name} (N, {', '.join(map(str, shape))})" for name, shape in shapes)
    return text, len(shapes)


@torch.no_grad()
def _read_scores(module: nn.Module, layout: HeadLayout, input_shape: tuple[int, ...],
                 guess_background: bool = True) -> tuple[HeadLayout, str | None]:  # fmt: skip
    """A boxes+scores (or YOLO per-level) ``layout`` told how the teacher's scores read
    (``_scores_read``), and the note to give where they look like SSD's logits
    (``_background_hint``), both from one run of the teacher on seeded random inputs."""
    x = torch.rand(4, *input_shape, generator=torch.Generator().manual_seed(0))
    raw = replace(layout, logits=False).probabilities(module.eval()(x))  # no sigmoid, softmax
    layout = _scores_read(layout, raw, guess_background)
    return layout, _background_hint(layout, raw)


def _scores_read(layout: HeadLayout, raw: torch.Tensor, guess_background: bool) -> HeadLayout:
    """``layout`` reading the teacher's ``raw`` score columns as logits where they leave
    [0, 1]; with ``guess_background`` (no --head given), as a softmax with a background column
    where, as probabilities of two or more columns, they sum to one at every location (SSD,
    RetinaFace). The background of a softmax (guessed, or said by --head ssd) is the first
    column, or, of three or more, the last where that one is on top at most locations
    (MMDetection's SSD).
    ``--head boxes+scores`` keeps every column a class (a softmax without a background)."""
    logits = bool(((raw < 0) | (raw > 1)).any())
    layout = replace(layout, logits=logits)
    softmax = raw.shape[-1] >= 2 and bool(((raw.sum(-1) - 1).abs() < 1e-3).all())
    guessed = not (logits or QUALITY in layout.parts) and softmax and guess_background
    if not (layout.background or guessed):
        return layout
    columns = raw.shape[-1]  # two: background and face (RetinaFace), the background first
    last = columns > 2 and _top_share(raw, columns - 1) >= BACKGROUND_TOP_SHARE
    return replace(layout, background=False, num_classes=columns).with_background(last)


BACKGROUND_TOP_SHARE = 0.9  # a column on top at this share of locations, ...
BACKGROUND_LOGIT_GAP = 2.0  # ... by this median margin over the next logit: a background


def _top_share(raw: torch.Tensor, column: int) -> float:
    """The share of locations at which ``column`` of the scores ``raw`` is the highest."""
    return float((raw.argmax(dim=-1) == column).float().mean())


def _background_hint(layout: HeadLayout, raw: torch.Tensor) -> str | None:
    """What to tell a run whose boxes+scores logits (``raw``) look like a softmax's with a
    background column (the first, or the last, on top by a clear margin at most locations):
    read through a sigmoid, SSD's ``cls_logits`` count the background as a class and the
    generator collapses onto it."""
    if (layout.name != "boxes+scores" or not layout.logits or layout.background
            or QUALITY in layout.parts or layout.num_classes < 2):  # fmt: skip
        return None
    columns = raw.shape[-1]  # the last only of three or more, as _scores_read reads them
    for column, which in ((0, "first"), (columns - 1, "last"))[: 1 + (columns > 2)]:
        others = torch.cat([raw[..., :column], raw[..., column + 1 :]], dim=-1)
        share = _top_share(raw, column)
        gap = float((raw[..., column] - others.max(dim=-1).values).median())
        if share >= BACKGROUND_TOP_SHARE and gap >= BACKGROUND_LOGIT_GAP:
            return (f"the {which} score column is the highest at {share:.0%} of locations on "
                    f"random inputs (by a median {gap:.1f} in logits): if it is the background "
                    "of a softmax (SSD's cls_logits), --head ssd reads it so; read through a "
                    "sigmoid it counts as a class and the generated inputs collapse onto "
                    "it")  # fmt: skip
    return None


@dataclass(frozen=True)
class Detection(Task):
    """Raw detection head outputs (``head``: the teacher's layout, once bound to it; else read
    from each output's shape); eval data as a COCO JSON or an .npz of images, boxes, labels."""

    head_name: str | None = None  # --head: the layout the user named
    head: HeadLayout | None = None  # the teacher's layout (``bound_to``)
    joins_outputs: bool = True  # several outputs are one head: boxes and scores
    needs_teacher_signature: bool = True  # the user's decoding and NMS read the outputs
    decoder: UserDecoder | None = None  # --decode: the user's decoding of the raw outputs
    # ``bound_to``: the logits look like SSD's without --head ssd (a note, not the task's identity)
    background_hint: str | None = field(default=None, compare=False)

    def layout_of(self, out: torch.Tensor) -> HeadLayout:
        """The head layout of a raw output (methods read detection heads through it)."""
        return self.head if self.head is not None else layout_of(out)

    def _layout_by(self, run: Callable[[], torch.Tensor]) -> HeadLayout:
        """The bound head's layout; unbound, that of the raw output ``run()`` gives (a probe
        run, which a bound task skips)."""
        return self.head if self.head is not None else layout_of(run())

    def with_head(self, name: str | None) -> Detection:
        if name is not None and name not in HEAD_NAMES:
            raise DaflError(f"--head {name}: unknown layout; choose one of {', '.join(HEAD_NAMES)}")
        return replace(self, head_name=name)

    def with_decoder(self, spec) -> Detection:
        return replace(self, decoder=None if spec is None else UserDecoder(spec))

    def user_file(self) -> Path | None:
        return self.decoder.file() if self.decoder is not None else None

    def decoding(self, layout: HeadLayout) -> Decoding:
        """How this task turns raw outputs of ``layout`` into detections (built in, or the
        user's --decode)."""
        return Decoding(layout, self.decoder)

    def object_boxes(self, out: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor | None:
        """(N, 4) each image's most confident detection as a centre/size box in pixels (the
        whole image where the user's decoding finds none); None where the boxes are encoded
        against anchors and no --decode says where they are."""
        layout = self.layout_of(out)
        decoding = self.decoding(layout)
        if not decoding.in_pixels:
            return None
        if decoding.user is None:
            best = layout.confidence(out).argmax(1)
            return layout.boxes(out)[torch.arange(len(best)), best]
        height, width = image_size
        whole = torch.tensor([width / 2, height / 2, width, height], dtype=torch.float32)
        found = decoding(out, image_size, threshold=0.0)
        return torch.stack([box_convert(d.boxes[d.scores.argmax()], "xyxy", "cxcywh")
                            if len(d) else whole for d in found])  # fmt: skip

    def bound_to(self, teacher) -> Detection:
        """This task reading ``teacher``'s head: its layout from the outputs the import joined
        (boxes and scores), from ``--head``, or from its one output's shape; the user's
        --decode tried once on the teacher's answer to random inputs; a note (``hints``) where
        its logits look like SSD's without --head ssd. DaflError naming the file when none
        fits."""
        try:
            layout, hint = self._layout(teacher)
        except DaflError as error:
            source = str(teacher.source)
            raise DaflError(str(error) if str(error).startswith(source)
                            else f"{source}: {error}") from None  # fmt: skip
        bound = replace(self, head=layout, background_hint=hint)
        if self.decoder is not None:
            x = torch.rand(2, *teacher.input_shape)  # a tuple or dict teacher: its main tensor
            out = evaluation.torch_outputs(MainOutput(teacher.module), x)
            bound.decoding(bound.head)(out, x.shape[-2:])
        return bound

    def hints(self) -> tuple[str, ...]:
        """What to tell a compress run about how the bound head is read: boxes encoded against
        anchors with no --decode, logits that look like SSD's without --head ssd, the anchors
        assumed for levels whose channels hold them."""
        hints = (self.background_hint,) if self.background_hint else ()
        head = self.head
        if head is not None and head.name == "yolov5" and head.levels and len(head.levels[0]) == 3:
            channels = head.levels[0][0]
            hints += (f"the levels' {channels} channels are read as {head.anchors} anchor(s) "
                      f"per cell of 5 + {head.num_classes} values (box, objectness, classes), "
                      "as YOLOv5/v7 lay them out" + (
                          "; if they are a YOLOv8 head's (64 box-distribution values, then the "
                          "classes), --head yolov8 reads them so"
                          if channels > DFL_CHANNELS else ""),)  # fmt: skip
        if self.head is None or self.decoding(self.head).in_pixels:
            return hints
        return (*hints, "the boxes are encoded against anchors the file does not hold: they "
                "are compared location by location (stricter than decoding) and the scenes get "
                "whole generated images; --decode FILE.py:FUNCTION (your decoding) measures "
                "and places them as your code reads them")  # fmt: skip

    def _layout(self, teacher) -> tuple[HeadLayout, str | None]:
        """The teacher's head layout, its boxes decoded about the cells the input size places
        where they are distances to the sides (``with_pyramid``), and a note on how its scores
        read (joined outputs)."""
        layout, hint = self._read_layout(teacher)
        image_size = tuple(teacher.input_shape)[-2:]
        return with_pyramid(layout, image_size, tuple(teacher.analysis.output_shape)), hint

    def _read_layout(self, teacher) -> tuple[HeadLayout, str | None]:
        """The teacher's head layout as its outputs show it, and a note on how its scores
        read (joined outputs)."""
        input_shape, shape = tuple(teacher.input_shape), tuple(teacher.analysis.output_shape)
        layout = joined_layout(teacher.details, self.head_name)
        if layout is not None and teacher.details.get("decoded_and_levels"):
            return layout, None
        if layout is not None:  # a YOLO head's levels keep their scores' background as given
            guess = self.head_name is None and bool(teacher.details.get("joined_outputs"))
            return _read_scores(teacher.module, layout, input_shape, guess_background=guess)
        if self.head_name is not None:
            layout = forced(self.head_name, shape)
        else:
            layout, (seen, count) = recognise(shape), _outputs_seen(teacher)
            if count != 1 or layout is None:
                raise DaflError(f"outputs {seen} fit no detection head layout; "
                                f"{describe_layouts()}")  # fmt: skip
        return layout, None

    def zoo_options(self, teacher: Teacher) -> dict[str, Any]:
        """The raw head a zoo detector must give: the bound layout (else the one the
        teacher's single output's shape shows), its classes and locations; ValueError for a
        YOLO head's raw levels, which no zoo model gives."""
        shape = getattr(teacher.analysis, "output_shape", None)
        layout = None if shape is None else self.head or recognise(tuple(shape))
        if layout is None:  # no raw head known: only models of decoded detections can be asked
            return {**super().zoo_options(teacher), "head": None}
        if layout.levels or layout.beside:  # the zoo's YOLO models give no raw levels
            raise ValueError("no zoo model gives a YOLO head's raw levels (the zoo's YOLO "
                             "models decode their boxes); the derived student, --student "
                             "auto, does")  # fmt: skip
        return {"num_classes": layout.num_classes, "head": layout.name,
                "locations": layout.locations(tuple(shape))}  # fmt: skip

    def describe_teacher(self) -> str:
        return self.head.describe() if self.head is not None else self.output_text

    def fits(self, output_shape: tuple[int, ...]) -> bool:
        return self.head is not None or recognise(tuple(output_shape)) is not None

    def output_shape(self, num_outputs: int,
                     input_shape: tuple[int, ...]) -> tuple[int, ...] | None:  # fmt: skip
        """Unknown from the classes alone (the locations depend on the head): None, so the
        zoo checks no shape (its torchvision detectors return lists of boxes)."""
        return None

    def check_output(self, teacher: nn.Module, shape: tuple[int, ...], device) -> int:
        with torch.no_grad():
            out = teacher(torch.rand(2, *shape, device=device))
        if not isinstance(out, torch.Tensor):
            raise DaflError(f"teacher output is {type(out).__name__}; {describe_layouts()}")
        layout = self.layout_of(out)
        if not torch.isfinite(out).all():
            raise DaflError("the teacher's output is NaN or infinite on random inputs")
        return layout.num_classes

    def distillation_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                          temperature: float) -> torch.Tensor:  # fmt: skip
        return detection_kd_loss(student_out, teacher_out, self.layout_of(teacher_out))

    def auto_method(self, batchnorm_layers: int) -> tuple[str, str] | None:
        return "dafl-det", (
            "DAFL adapted per location (one-hot on the teacher's confident locations, class "
            "balance over them, activation loss): the detection benchmarks' best; the "
            "BatchNorm-statistics prior (bn-prior-det) measured worse where a teacher keeps "
            "BatchNorm (benchmarks/RESULTS.md)"
        )

    def race_candidates(self, batchnorm_layers: int) -> tuple[str, ...] | None:
        return ("dafl-det", "bn-prior-det") if batchnorm_layers else ("dafl-det",)

    def health_logits(self, teacher_out: torch.Tensor, student_out: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Class logits at the teacher's confident locations (its best one per image at least)."""
        layout = self.layout_of(teacher_out)
        confidence = layout.confidence(teacher_out)
        keep = confidence >= DETECTION_THRESHOLD
        keep[torch.arange(len(keep)), confidence.argmax(1)] = True
        logit = lambda out: torch.logit(layout.class_scores(out)[keep].clamp(1e-4, 1 - 1e-4))  # noqa: E731
        return logit(teacher_out), logit(student_out)

    def found_share(self, teacher_out: torch.Tensor) -> float:
        """Share of images with at least one detection above the threshold."""
        confidence = self.layout_of(teacher_out).confidence(teacher_out)
        return float((confidence.max(1).values > DETECTION_THRESHOLD).float().mean())

    def measure(self, teacher: nn.Module, student_onnx: Path, data, sampler) -> TaskScores | None:
        if data is None and sampler is None:
            return None
        layout = self._layout_by(lambda: evaluation.torch_outputs(
            teacher, data.x[:1] if data is not None else sampler(1)))  # fmt: skip
        decoding = self.decoding(layout)
        if isinstance(data, DetectionEvalData) and decoding.in_pixels:
            return evaluation.measure_on_data(teacher, student_onnx, data, decoding)
        if data is not None:  # boxes encoded against anchors: not comparable to the labels
            return evaluation.measure_fidelity(
                teacher, student_onnx, data.x, decoding,
                "eval images (boxes encoded against anchors: labels unused)")  # fmt: skip
        return evaluation.measure_fidelity(teacher, student_onnx,
                                           sampler(evaluation.GENERATED_SCENES).cpu(), decoding,
                                           "generated inputs")  # fmt: skip

    def onnx_score(self, model: Path, data) -> float | None:
        """mAP@0.5 on the eval data; None for boxes encoded against anchors (not comparable
        with the labels) without --decode."""
        decoding = self.decoding(self._layout_by(
            lambda: evaluation.onnx_outputs(model, data.x[:1])))  # fmt: skip
        return evaluation.onnx_map_50(model, data, decoding) if decoding.in_pixels else None

    def onnx_agreement(self, reference: Path, candidate: Path,
                       inputs) -> tuple[str, float | None]:  # fmt: skip
        """Fidelity: mAP@0.5 of ``candidate``'s detections against ``reference``'s."""
        x = torch.as_tensor(inputs, dtype=torch.float32)
        layout = self._layout_by(lambda: evaluation.onnx_outputs(reference, x[:1]))
        return FIDELITY, evaluation.onnx_fidelity(reference, candidate, x, self.decoding(layout))

    def finish_export(self, student_onnx: Path, teacher) -> dict[str, Any] | None:
        """student.onnx given the teacher's outputs (split again where the import joined them)
        and, for an ONNX teacher, the rest of its signature (``Task.finish_export``)."""
        several = self.head is not None and len(self.head.outputs) > 1
        if several:
            split.split_outputs(student_onnx, self.head)
        if teacher.format != "onnx":
            return {"outputs": list(self.head.outputs)} if several else None
        return super().finish_export(student_onnx, teacher)

    def classes_of(self, output_shape: tuple[int, ...]) -> int:
        layout = self.head or recognise(tuple(output_shape))
        return layout.num_classes if layout else 0

    def load_eval_data(self, path: Path, input_shape: tuple[int, ...], domain: InputDomain,
                       num_classes: int | None) -> DetectionEvalData:  # fmt: skip
        return load_detection_data(path, input_shape, domain, num_classes)

    def plot_samples(self, sampler, teacher: nn.Module, student: nn.Module,
                     domain: InputDomain, path: Path) -> None:  # fmt: skip
        from compress_toolbox.tasks.detection.pictures import plot_detections  # matplotlib

        layout = self._layout_by(lambda: evaluation.torch_outputs(teacher, sampler(1).cpu()))
        plot_detections(sampler, teacher, student, domain, path, self.decoding(layout))


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
