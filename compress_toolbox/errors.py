"""User-facing errors: the CLI prints these as one line and exits with code 2."""

from __future__ import annotations


class DaflError(Exception):
    """A problem with the user's input (file, option, data) that we can explain in one line."""


class ImportFailed(DaflError):
    """A teacher file could not be read or converted."""


class VerificationFailed(DaflError):
    """An imported or exported model does not compute what the original computes."""
