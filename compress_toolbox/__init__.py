"""dafl-compress: data-free compression of a trained teacher into a verified ONNX student.

One pipeline, one package per stage, data flowing one way:

    load/          load_teacher -> Teacher         (importers, graph clean-ups, analysis)
    student/       plan_student -> StudentPlan     (derived by shrinking widths, or the zoo's)
    distillation/  distill -> DistillResult        (the loop, recipe, health, methods/)
    export/        export_student -> ExportResult  (the ONNX writer, verification)
                   quantize_model -> Int8Result    (INT8 from a generator or inputs, judged)
    report/        report.json, report.md, plots
    tasks/         what each task means (one plug-in file per task)

``compress(teacher_path, CompressConfig(...))`` runs them all (pipeline.py).
"""

from compress_toolbox.config import (
    CompressConfig,
    OutputOptions,
    QuantizeOptions,
    StudentOptions,
    TeacherOptions,
)
from compress_toolbox.distillation import distill
from compress_toolbox.distillation.options import DistillOptions, DistillResult
from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError, ImportFailed, TrainingFailed, VerificationFailed
from compress_toolbox.export.int8 import Int8Result, quantize_model
from compress_toolbox.export.writer import ExportResult, export_student
from compress_toolbox.load.analysis import Analysis, analyse
from compress_toolbox.load.teacher import Teacher, load_teacher
from compress_toolbox.pipeline import CompressResult, compress
from compress_toolbox.student.derive import make_student
from compress_toolbox.student.plan import StudentPlan, plan_student
from compress_toolbox.tasks import Task, get_task, register_task

__all__ = [
    "Analysis",
    "CompressConfig",
    "CompressResult",
    "DaflError",
    "DistillOptions",
    "DistillResult",
    "ExportResult",
    "ImportFailed",
    "InputDomain",
    "Int8Result",
    "OutputOptions",
    "QuantizeOptions",
    "StudentOptions",
    "StudentPlan",
    "Task",
    "Teacher",
    "TeacherOptions",
    "TrainingFailed",
    "VerificationFailed",
    "analyse",
    "compress",
    "distill",
    "export_student",
    "get_task",
    "load_teacher",
    "make_student",
    "plan_student",
    "quantize_model",
    "register_task",
]
