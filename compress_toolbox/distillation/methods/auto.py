"""``--method auto``: which method to run on a teacher, from the teacher's properties, as the
teacher suite measured (benchmarks/RESULTS.md); a task may have its own rule
(``Task.auto_method``). ``--method race`` (distillation/race.py) measures instead, among the
candidates named here."""

from __future__ import annotations

from compress_toolbox.distillation.methods.base import MethodContext
from compress_toolbox.tasks import Task

# what ``--method``'s help says of auto (the rule below and the tasks' own)
SUMMARY = ("picks from the teacher: bn-prior when it keeps BatchNorm layers, else adversarial "
           "(a task may choose otherwise: dafl-seg for segmentation)")  # fmt: skip


def choose_method(ctx: MethodContext) -> tuple[str, str]:
    """(method name, the reason, for the report)."""
    return rule(ctx.task, ctx.batchnorm_layers())


def rule(task: Task, layers: int) -> tuple[str, str]:
    """Auto's choice for a teacher with ``layers`` BatchNorm layers: (method, reason)."""
    task_rule = task.auto_method(layers)
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


# what ``--method``'s help says of race (distillation/race.py)
RACE_SUMMARY = ("trains auto's candidates (dafl, adversarial, and bn-prior when the teacher keeps "
                "BatchNorm layers; segmentation: dafl-seg, dafl and adversarial; detection: "
                "dafl-det and bn-prior-det) for a quarter of the "
                "budget, then continues the student that agrees best with the teacher on every "
                "candidate's generated inputs")  # fmt: skip


def race_candidates(task: Task, batchnorm_layers: int) -> tuple[str, ...]:
    """The methods ``--method race`` trains side by side on a teacher with ``batchnorm_layers``
    BatchNorm layers (a task may name its own: ``Task.race_candidates``)."""
    own = task.race_candidates(batchnorm_layers)
    if own is not None:
        return own
    return ("dafl", "adversarial", "bn-prior") if batchnorm_layers else ("dafl", "adversarial")
