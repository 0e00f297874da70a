"""The task names: the one place that knows them (the zoo, the pipeline and the CLI import them)."""

from __future__ import annotations

from .errors import DaflError

KNOWN_TASKS = ("classification", "segmentation", "detection")
SUPPORTED_TASKS = ("classification",)  # what can be distilled today


def check_task(task: str) -> None:
    """DaflError for an unknown task or one that cannot be distilled yet."""
    if task not in KNOWN_TASKS:
        raise DaflError(f"--task {task}: unknown task; choose one of {', '.join(KNOWN_TASKS)}")
    if task not in SUPPORTED_TASKS:
        raise DaflError(
            f"--task {task} is not supported yet; only {', '.join(SUPPORTED_TASKS)} is"
        )
