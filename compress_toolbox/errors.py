"""User-facing errors: the CLI prints these as one line and exits with their ``exit_code``."""

from __future__ import annotations


class DaflError(Exception):
    """A problem with the user's input (file, option, data) that we can explain in one line."""

    exit_code = 2


class ImportFailed(DaflError):
    """A teacher file could not be read or converted."""


class VerificationFailed(DaflError):
    """An imported or exported model does not compute what the original computes."""


class QuantizeError(DaflError):
    """A model could not be quantised, or the options asked for something unsupported."""


class TrainingFailed(DaflError):
    """Training ran but produced no usable student (collapse, far below the teacher, NaN)."""

    exit_code = 3


class DaflWarning(UserWarning):
    """Something the user should know that does not stop the run (shown by the CLI as one line:
    a budget too short for the teacher, a generator restart, a smaller batch after OOM)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message, at most ``limit`` characters ("" when it has
    none): what one-line reports quote of a library's multi-line error."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else ""
