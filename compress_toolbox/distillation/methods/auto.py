"""``--method auto``: which method to run on a teacher, from the teacher's properties, as the
teacher suite measured (benchmarks/RESULTS.md); a task may have its own rule
(``Task.auto_method``)."""

from __future__ import annotations

from compress_toolbox.distillation.methods.base import MethodContext

# what ``--method``'s help says of auto (the rule below and the tasks' own)
SUMMARY = ("picks from the teacher: bn-prior when it keeps BatchNorm layers, else adversarial "
           "(a task may choose otherwise: dafl for segmentation)")  # fmt: skip


def choose_method(ctx: MethodContext) -> tuple[str, str]:
    """(method name, the reason, for the report)."""
    layers = ctx.batchnorm_layers()
    task_rule = ctx.task.auto_method(layers)
    if task_rule is not None:
        return task_rule
    if layers:
        return "bn-prior", (
            f"the teacher keeps {layers} BatchNorm layers, whose recorded statistics guide "
            "generation (best on the suite's BatchNorm teachers)"
        )
    return "adversarial", (
        "the teacher has no BatchNorm statistics to match (folded by the ONNX exporter, or "
        "none); DAFL with adversarial exploration measured best on the suite's teachers "
        "without them (7 to 19 points of the teacher above DAFL alone on a folded ResNet-8, "
        "level on the others)"
    )
