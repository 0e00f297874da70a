"""One typed configuration of a whole run: ``CompressConfig``, one dataclass per stage.

Python users build it directly (``CompressConfig(task="segmentation", distill=DistillOptions(
time_budget=60))``) or from flat option names, the CLI's (``CompressConfig.from_options(
time_budget=60, out="out")``); the CLI builds it from its arguments the same way. It is checked
once, when built: names become objects (the ``Task``, the ``Preset``), ``--init auto`` becomes
the choice the run will make, and every bad value raises a one-line ``DaflError`` before any
work starts. Stages read it and never change it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from compress_toolbox.distillation.options import DistillOptions
from compress_toolbox.distillation.presets import Preset
from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError
from compress_toolbox.export.quantize import DEFAULT_SAMPLES, MODES
from compress_toolbox.export.writer import check_opset
from compress_toolbox.tasks import Task, get_task

INITS = ("auto", "fresh", "teacher")


@dataclass(frozen=True)
class TeacherOptions:
    """How to read the teacher file (see ``load_teacher``) and its input normalisation."""

    model_class: str | None = None  # "file.py:Class" for a state_dict checkpoint
    model_kwargs: dict | str | None = None
    input_shape: tuple[int, ...] | str | None = None  # when the file does not fix it
    trust_pickle: bool = False  # --trust-model-code: run code the model file carries
    mean: tuple[float, ...] | None = None  # the teacher's input normalisation, per channel
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class StudentOptions:
    """Which student: derived (``auto``), the zoo's pick (``zoo``) or ``zoo:NAME``."""

    student: str = "auto"
    width: float = 0.5  # of every layer, for a derived student
    init: str = "auto"  # auto, fresh or teacher (a derived student's starting weights)


@dataclass(frozen=True)
class OutputOptions:
    """Where and how the output folder is written."""

    out: Path | None = None  # None: beside the teacher (outdir.default_out_dir)
    force: bool = False  # replace an existing output folder
    dry_run: bool = False  # load, check and plan only
    opset: int | None = None  # ONNX opset of student.onnx (None: the exporter's)
    command: str | None = None  # the command line, for the report

    def __post_init__(self) -> None:
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))


@dataclass(frozen=True)
class QuantizeOptions:
    """INT8 copies of the exported models (export/int8.py): ``mode`` None (none) or "int8";
    ``samples`` generated inputs to calibrate on; ``teacher`` also quantises the teacher (the
    report's "teacher int8" row). Flat names: ``quantize``, ``quantize_samples``,
    ``quantize_teacher``."""

    mode: str | None = None
    samples: int = DEFAULT_SAMPLES
    teacher: bool = False

    FLAT = {"quantize": "mode", "quantize_samples": "samples", "quantize_teacher": "teacher"}

    def __post_init__(self) -> None:
        if self.mode is not None and str(self.mode).lower() not in MODES:
            raise DaflError(f"--quantize {self.mode!r}: supported: {', '.join(MODES)}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) \
                or self.samples < 1:  # fmt: skip
            raise DaflError(f"--quantize-samples {self.samples!r}: expected a positive integer")
        if self.teacher and self.mode is None:
            raise DaflError("--quantize-teacher needs --quantize int8")
        if self.mode is not None:
            object.__setattr__(self, "mode", str(self.mode).lower())

    @classmethod
    def from_flat(cls, options: dict[str, Any]) -> QuantizeOptions:
        """Takes (pops) the flat names from ``options``; None values keep the defaults."""
        values = {cls.FLAT[key]: options.pop(key) for key in list(options) if key in cls.FLAT}
        return cls(**{key: value for key, value in values.items() if value is not None})


@dataclass(frozen=True)
class CompressConfig:
    """Everything a ``compress`` run needs besides the teacher file; checked when built."""

    task: Task | str = "classification"
    teacher: TeacherOptions = field(default_factory=TeacherOptions)
    student: StudentOptions = field(default_factory=StudentOptions)
    distill: DistillOptions = field(default_factory=DistillOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    eval_data: Path | None = None  # labelled data to measure both models (never trained on)
    preset: Preset = field(init=False)  # resolved from distill.preset
    init: str = field(init=False)  # the student's start: fresh or teacher
    init_may_fall_back: bool = field(init=False)  # auto's choice may give way; the user's not

    def __post_init__(self) -> None:
        task = get_task(self.task)
        distill = replace(self.distill, task=task,
                          batch_size=self.distill.batch_size or task.batch_size)  # fmt: skip
        preset = distill.validate()
        init = self.student.init
        if init not in INITS:
            raise DaflError(f"--init {init!r}: expected {', '.join(INITS)}")
        check_opset(self.output.opset)
        InputDomain.from_options(self.teacher.mean, self.teacher.std)  # channels: at load
        values = {"task": task, "distill": distill, "preset": preset,
                  "eval_data": Path(self.eval_data) if self.eval_data else None,
                  "init": task.student_init or preset.student_init if init == "auto" else init,
                  "init_may_fall_back": init == "auto"}  # fmt: skip
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_options(cls, **options: Any) -> CompressConfig:
        """A config from flat option names, the CLI's long options with ``_`` for ``-``
        (``task``, ``eval_data``, ``student``, ``out``, ``time_budget``, ``mean``, ``quantize``,
        ...), each
        sorted into its stage's dataclass. An unknown name raises DaflError."""
        top = {key: options.pop(key) for key in ("task", "eval_data") if key in options}
        head, decoder = options.pop("head", None), options.pop("decode", None)
        if head is not None or decoder is not None:
            task = get_task(top.get("task", "classification"))
            top["task"] = task.with_head(head).with_decoder(decoder)
        parts: dict[str, Any] = {"quantize": QuantizeOptions.from_flat(options)}
        for name, kind in (("teacher", TeacherOptions), ("student", StudentOptions),
                           ("distill", DistillOptions), ("output", OutputOptions)):  # fmt: skip
            names = {f.name for f in fields(kind)}
            parts[name] = kind(**{key: options.pop(key) for key in list(options) if key in names})
        if options:
            raise DaflError(f"unknown option(s): {', '.join(sorted(options))}")
        return cls(**top, **parts)
