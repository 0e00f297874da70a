"""Tasks as plug-ins: one file per task (``classification.py``, ``segmentation.py``; a package
for ``detection``) defines a
``Task`` (``base.py``) and registers it here. Everything else asks the registry for the task's
object and never compares task names.

Adding a task: a new module with a ``Task`` subclass passed to ``register_task`` (and imported
at the end of this file, or by the caller for a task outside the package).
"""

from __future__ import annotations

from compress_toolbox.errors import DaflError
from compress_toolbox.tasks.base import Task
from compress_toolbox.tasks.outputs import (
    FILE_OUTPUTS,
    MainOutput,
    SigmoidAsTwoClasses,
    SigmoidMap,
    Softmaxed,
    as_samples,
    labels_as_samples,
)

_TASKS: dict[str, Task] = {}
PLANNED_TASKS: tuple[str, ...] = ()  # named by --task and the zoo; not distilled yet


def register_task(task: Task) -> Task:
    """Make ``task`` known by its name; a second task of the same name is refused."""
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def task_names() -> tuple[str, ...]:
    """Every task --task accepts: the registered ones, then the planned ones."""
    return (*_TASKS, *(name for name in PLANNED_TASKS if name not in _TASKS))


def get_task(task: str | Task) -> Task:
    """The registered ``Task`` named ``task`` (a Task is returned as it is); DaflError for an
    unknown task or one that cannot be distilled yet."""
    if isinstance(task, Task):
        return task
    if task in _TASKS:
        return _TASKS[task]
    if task in PLANNED_TASKS:
        raise DaflError(f"--task {task} is not supported yet; only {' and '.join(_TASKS)} are")
    raise DaflError(f"--task {task}: unknown task; choose one of {', '.join(task_names())}")


def task_of_output(output_shape: tuple[int, ...]) -> Task | None:
    """The registered task whose teachers give ``output_shape`` (no batch), else None."""
    return next((t for t in _TASKS.values() if t.fits(tuple(output_shape))), None)


def registered_task(name: str) -> Task | None:
    """The registered task of that name, None for a planned or unknown one (the zoo holds
    models of planned tasks too)."""
    return _TASKS.get(name)


__all__ = [
    "FILE_OUTPUTS",
    "MainOutput",
    "PLANNED_TASKS",
    "SigmoidAsTwoClasses",
    "SigmoidMap",
    "Softmaxed",
    "Task",
    "as_samples",
    "get_task",
    "labels_as_samples",
    "register_task",
    "registered_task",
    "task_names",
    "task_of_output",
]

# the built-in tasks register themselves (last: they import the names above)
from compress_toolbox.tasks import classification, detection, segmentation  # noqa: E402, F401
