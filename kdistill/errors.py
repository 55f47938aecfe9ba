"""Errors for people: what went wrong, where, and how to fix it.

Every error raised on bad input is a `KDError` (or subclass). The CLI prints `str(err)` as one line and exits 2.
"""

from __future__ import annotations


class KDError(Exception):
    """A user-facing error. Message format: ``what (where): how to fix``."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        msg = what
        if where:
            msg += f" ({where})"
        if fix:
            msg += f": {fix}"
        super().__init__(" ".join(msg.split()))


class ConfigError(KDError):
    """The configuration is invalid."""


class DataError(KDError):
    """A dataset is missing, empty or malformed."""


class TapError(KDError):
    """A tap names a module path that does not exist, or selects an output that is not there."""


class WiringError(KDError):
    """Teacher and student (or a loss term) do not fit together: shapes, classes, vocabularies, dtypes."""


class CheckpointError(KDError):
    """A checkpoint or weights file cannot be read or written."""


class CacheError(KDError):
    """A teacher-output cache is missing, stale or does not match the run."""


class NonFiniteError(KDError):
    """A loss term or gradient became NaN/Inf and the policy is `stop`."""
