"""dafl-compress: data-free compression of a trained teacher into a verified ONNX student.

The pipeline, one module per stage, data flowing one way:
load_teacher (teacher.py) -> analyse (analysis.py) -> make_student (student.py) or model_zoo ->
distill (distill.py, methods/) -> export_student (export.py) -> write_report (report.py);
compress (pipeline.py) runs them all.
"""

from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError, ImportFailed, TrainingFailed, VerificationFailed
from compress_toolbox.load.analysis import Analysis, analyse
from compress_toolbox.load.teacher import Teacher, load_teacher
from compress_toolbox.student.derive import make_student

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
