"""What every task is: the ``Task`` a plug-in file (``classification.py``, ``segmentation.py``)
fills in and registers. The pipeline, the trainer, the methods and the zoo ask the task, never
its name.

A task says which teacher outputs it accepts (``check_output``), how many classes they have, and
how its logits become per-sample class scores (``outputs.as_samples``): a classifier's (N, K)
logits are N samples; a segmentation teacher's (N, K, H, W) logits are N*H*W pixel samples, so
that the one-hot, information-entropy, KD and adversarial losses and the collapse guard's class
histogram all act per pixel, averaged over the batch's pixels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress_toolbox.distillation.losses import kd_loss
from compress_toolbox.errors import DaflError, DaflWarning, VerificationFailed, first_line
from compress_toolbox.export.signature import SignatureCheck, take_teacher_signature

if TYPE_CHECKING:
    from compress_toolbox.domain import InputDomain
    from compress_toolbox.load.teacher import Teacher
    from compress_toolbox.tasks.evaldata import EvalData


@dataclass
class TaskScores:
    """A task's own measurement of teacher and student (``Task.measure``): the pass/fail
    ``figure`` of both, the input-blind predictor's, the student's agreement with the teacher,
    and what the task adds to report.json (``report``), to the teacher's and student's entries
    (``teacher_fields``, ``student_fields``) and to report.md's table (``rows``: label, key of
    those fields, format)."""

    figure: str
    teacher: float | None
    student: float | None
    trivial: float | None = None
    trivial_what: str = ""  # what the input-blind predictor answers
    agreement: float | None = None
    agreement_on: str | None = None
    report: dict[str, Any] = field(default_factory=dict)
    teacher_fields: dict[str, Any] = field(default_factory=dict)
    student_fields: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Task:
    """A task: what its teachers output (``output_dims`` dimensions after the batch) and how
    the pipeline treats them. Subclasses override the methods whose behaviour differs."""

    name: str
    output_dims: int
    output_text: str  # the expected output, for messages
    batch_size: int | None = None  # generated batch when no --batch-size (None: the preset's)
    student_init: str | None = None  # what --init auto means (None: the preset's choice)
    # with --init auto, a derived student without BatchNorm whose teacher's weights keep less
    # than this of the teacher's answers (derive.answers_kept) starts fresh (None: not checked)
    min_answers_kept: float | None = None
    health_samples: int = 256  # generated inputs per health check (the class histogram)
    monitor_samples: int = 1000  # evaluation inputs for the curve during training (0: none)
    # what is done to each generated image before the teacher sees it (keys of
    # generator.AUGMENTATIONS, in order; images only)
    generated_augmentations: tuple[str, ...] = ()
    one_class_per_input: bool = True  # a class-conditional generator can draw one per input
    flat_inputs: bool = False  # teachers of (features,) inputs can do this task
    figure: str = "accuracy"  # the pass/fail figure on --eval-data
    joins_outputs: bool = False  # a teacher's several outputs are read as one (joined) tensor
    # a student.onnx without the ONNX teacher's exact signature fails the run (else: reported)
    needs_teacher_signature: bool = False

    def fits(self, output_shape: tuple[int, ...]) -> bool:
        """Whether a teacher whose output is ``output_shape`` (no batch) does this task."""
        return len(output_shape) == self.output_dims and output_shape[0] >= 2

    def classes_of(self, output_shape: tuple[int, ...]) -> int:
        """The number of classes of a teacher whose output is ``output_shape`` (no batch)."""
        return output_shape[0] if output_shape else 0

    def output_shape(self, num_outputs: int, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output (no batch) a model of this task gives for ``input_shape``."""
        raise NotImplementedError

    def zoo_options(self, teacher: Teacher) -> dict[str, Any]:
        """What a zoo model of this task is built with for ``teacher`` besides its input
        (``model_zoo.get_model``'s keywords): by default the teacher's outputs as classes."""
        return {"num_classes": int(teacher.num_outputs)}

    def hints(self) -> tuple[str, ...]:
        """What to tell the user, once at the start of a run, about how this bound task reads
        the teacher (none by default)."""
        return ()

    def with_head(self, name: str | None) -> Task:
        """This task reading heads of the layout ``name`` (``--head``; detection only)."""
        if name is not None:
            raise DaflError(f"--head {name}: --head names a detection head layout; it needs "
                            "--task detection")  # fmt: skip
        return self

    def with_decoder(self, spec: Any) -> Task:
        """This task decoding raw outputs with the user's ``spec`` (``--decode``; detection
        only)."""
        if spec is not None:
            raise DaflError(f"--decode {spec}: --decode decodes a detection head's raw outputs; "
                            "it needs --task detection")  # fmt: skip
        return self

    def user_file(self) -> Path | None:
        """The user's code file this task runs (detection's --decode), which the output
        folder must not hold; None by default."""
        return None

    def bound_to(self, teacher: Teacher) -> Task:
        """This task as it reads ``teacher`` (detection: its head layout); by default itself.
        DaflError, with one line, when the teacher's outputs cannot be read."""
        return self

    def describe_teacher(self) -> str:
        """How this task reads the teacher it is bound to, in words (``inspect --task``)."""
        return self.output_text

    def check_output(self, teacher: nn.Module, shape: tuple[int, ...], device) -> int:
        """The number of classes of ``teacher``'s output on random inputs; DaflError when the
        output does not fit this task or is not finite."""
        with torch.no_grad():
            out = teacher(torch.rand(2, *shape, device=device))
        if not isinstance(out, torch.Tensor) or not self.fits(tuple(out.shape[1:])):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DaflError(f"teacher output is {got}; --task {self.name} needs {self.output_text}")
        if not torch.isfinite(out).all():
            raise DaflError("the teacher's output is NaN or infinite on random inputs")
        return int(out.shape[1])

    def distillation_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                          temperature: float) -> torch.Tensor:  # fmt: skip
        """What a student step minimises: KD on per-sample logits (``losses.kd_loss``)."""
        return kd_loss(student_out, teacher_out, temperature)

    def health_logits(self, teacher_out: torch.Tensor, student_out: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Teacher's and student's outputs as class logits (classes on dim 1) for the health
        checks' class histogram and agreement; by default the outputs themselves."""
        return teacher_out, student_out

    def found_share(self, teacher_out: torch.Tensor) -> float:
        """Share of inputs in which the teacher finds something; every input by default (a
        classifier answers on each)."""
        return 1.0

    def measure(self, teacher: nn.Module, student_onnx: Path, data: EvalData | None,
                sampler: Callable[[int], torch.Tensor] | None) -> TaskScores | None:  # fmt: skip
        """Teacher (PyTorch) and student (``student_onnx`` in onnxruntime) measured the task's
        own way; None: the pipeline's accuracy / mean IoU measurement."""
        return None

    def onnx_score(self, model: Path, data: EvalData) -> float | None:
        """``figure`` of an ONNX model of this task's teachers on labelled ``data``, run by
        onnxruntime at its fixed batch if any (an INT8 copy against its float model); None
        when it cannot be measured. By default accuracy, or mean IoU for masks."""
        from compress_toolbox.export.writer import onnx_predictions
        from compress_toolbox.tasks.evaldata import score

        return score(onnx_predictions(model, data.x), data.y)

    def onnx_agreement(self, reference: Path, candidate: Path,
                       inputs) -> tuple[str, float | None] | None:  # fmt: skip
        """(what, how closely) the ONNX ``candidate`` answers as ``reference`` on ``inputs``
        (a numpy batch), the task's own way; None for this default: the caller's top-1
        agreement of the first output."""
        return None

    def finish_export(self, student_onnx: Path, teacher: Teacher) -> dict[str, Any] | None:
        """Give the exported ``student_onnx`` (verified against the PyTorch student) an ONNX
        teacher's input and output names and declared dimensions, in place, and compare the
        two files' signatures (``export/signature.py``): what report.json should say about it,
        or None for a teacher of another format. Where ``needs_teacher_signature``, a
        difference fails the run; else it is warned about and reported, and a file that cannot
        be given the signature is left as it was."""
        if teacher.format != "onnx":
            return None
        original = student_onnx.read_bytes()
        try:
            check = take_teacher_signature(student_onnx, teacher.source,
                                           tuple(teacher.input_shape),
                                           teacher.details.get("output"))  # fmt: skip
        except Exception as error:  # after training: a name is not worth the run
            if self.needs_teacher_signature:
                raise
            student_onnx.write_bytes(original)
            check = SignatureCheck(None, (f"not given ({first_line(error)})",))
        if check.differences:
            message = f"student.onnx does not have the teacher's signature: " \
                      f"{'; '.join(check.differences)}"  # fmt: skip
            if self.needs_teacher_signature:
                raise VerificationFailed(message)
            warnings.warn(message, DaflWarning, stacklevel=2)
        return check.as_report()

    def auto_method(self, batchnorm_layers: int) -> tuple[str, str] | None:
        """``--method auto`` for this task: (method, reason), or None for the general rule
        (methods/auto.py)."""
        return None

    def race_candidates(self, batchnorm_layers: int) -> tuple[str, ...] | None:
        """The methods ``--method race`` trains side by side for this task, or None for the
        general candidates (methods/auto.py)."""
        return None

    def load_eval_data(self, path: Path, input_shape: tuple[int, ...], domain: InputDomain,
                       num_classes: int | None) -> EvalData:  # fmt: skip
        """The labelled evaluation data at ``path`` shaped for the teacher."""
        raise NotImplementedError

    def plot_samples(self, sampler, teacher: nn.Module, student: nn.Module,
                     domain: InputDomain, path: Path) -> None:  # fmt: skip
        """samples.png: generated inputs and what the models make of them."""
        raise NotImplementedError
