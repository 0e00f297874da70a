"""dafl-compress: data-free compression of a trained teacher into a verified ONNX student.

The pipeline, one module per stage, data flowing one way:
load_teacher (teacher.py) -> analyse (analysis.py) -> make_student (student.py) or model_zoo ->
distill (distill.py, methods/) -> export_student (export.py) -> write_report (report.py);
compress (pipeline.py) runs them all.
"""

from .analysis import Analysis, analyse
from .domain import InputDomain
from .errors import DaflError, ImportFailed, TrainingFailed, VerificationFailed
from .student import make_student
from .teacher import Teacher, load_teacher

__all__ = [
    "Analysis",
    "DaflError",
    "ImportFailed",
    "InputDomain",
    "Teacher",
    "TrainingFailed",
    "VerificationFailed",
    "analyse",
    "load_teacher",
    "make_student",
]
