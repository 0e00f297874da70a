"""Checks on a zip archive before anything of it is loaded.

TorchScript, torch.export (.pt2), torch checkpoints and Keras files are zip archives, read by
Python's ``zipfile`` (our own checks) and by torch's C++ reader (the load itself). The two
disagree on hostile archives: with two members of one name ``zipfile`` reads the last and torch
the first, and torch looks names up ignoring case. An archive where they could differ, or that
expands beyond memory, is refused before either reads a member.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from compress_toolbox.errors import ImportFailed
from compress_toolbox.limits import available_memory

ZIP_MAGIC = b"PK\x03\x04"  # a local file header: where torch's reader expects the archive to start
READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # all that torch's reader inflates
# Weights barely compress: a member that inflates over 100x beyond 16 MiB is a bomb, not a model
# (Keras's own loader uses the same ratio).
RATIO_LIMIT = 100
RATIO_FLOOR = 16 * 2**20
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_DRIVE = re.compile(r"[A-Za-z]:")


def is_model_zip(path: Path, head: bytes) -> bool:
    """Whether ``path`` is a zip archive as torch reads one: the archive starts the file. A file
    that only ends like a zip (data before the first member) is judged by its first bytes."""
    return head.startswith(ZIP_MAGIC) and zipfile.is_zipfile(path)


def checked_member_names(path: Path) -> list[str]:
    """Member names of the zip archive ``path``, once it has passed the checks: no two members
    whose names match ignoring case, no absolute, ``..``, backslash or NUL names, only stored or
    deflated members, and declared sizes that neither expand absurdly (over 100x beyond 16 MiB)
    nor exceed the memory available. Raises ImportFailed (one line) otherwise."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as error:
        raise ImportFailed(f"{path}: damaged zip archive ({error})") from None
    problem = _name_problem(members) or _size_problem(members, path.stat().st_size)
    if problem:
        raise ImportFailed(f"{path}: refused zip archive: {problem}")
    return [member.filename for member in members]


def _name_problem(members: list[zipfile.ZipInfo]) -> str | None:
    seen: dict[str, str] = {}
    for member in members:
        name = member.orig_filename  # zipfile's .filename is cut at a NUL byte
        if "\x00" in name:
            return f"member {name!r} has a NUL byte in its name"
        if "\\" in name:
            return f"member {name!r} has a backslash in its name"
        if name.startswith("/") or _DRIVE.match(name):
            return f"member {name!r} is an absolute path"
        if ".." in name.split("/"):
            return f"member {name!r} climbs out of the archive (..)"
        key = name.translate(_ASCII_LOWER)  # torch's reader finds names ignoring ASCII case
        if key in seen and seen[key] == name:
            return f"two members are named {name!r}: zip readers disagree on which one is read"
        if key in seen:
            return (
                f"members {seen[key]!r} and {name!r} differ only in case, "
                "which torch's zip reader ignores"
            )
        seen[key] = name
    return None


def _size_problem(members: list[zipfile.ZipInfo], file_bytes: int) -> str | None:
    for member in members:
        if member.compress_type not in READABLE_METHODS:
            return (
                f"member {member.filename!r} uses compression method {member.compress_type} "
                "(only stored and deflated members are read)"
            )
        if member.file_size > RATIO_FLOOR and member.file_size > RATIO_LIMIT * member.compress_size:
            return (
                f"member {member.filename!r} expands from {_size(member.compress_size)} to "
                f"{_size(member.file_size)}: a zip bomb"
            )
    total = sum(member.file_size for member in members)
    if total > RATIO_FLOOR and total > RATIO_LIMIT * file_bytes:
        return f"its members expand to {_size(total)} from a {_size(file_bytes)} file: a zip bomb"
    free = available_memory(torch.device("cpu"))
    if free is not None and total > free:
        return f"its members expand to {_size(total)}, more than the {_size(free)} of memory free"
    return None


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
