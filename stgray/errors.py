"""User-facing errors: the CLI prints them as one line and exits non-zero, no traceback."""

from __future__ import annotations


class StgrayError(Exception):
    """An error caused by input the user controls (files, configs, store, credentials).

    Rendered as ``"<where>: <field>: <problem>"`` with empty parts left out.
    """

    exit_code = 2

    def __init__(self, problem: str, *, where: str | None = None, field: str | None = None):
        self.problem = problem
        self.where = where
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.where, self.field, self.problem) if p]
        return ": ".join(str(p) for p in parts)


class ConfigError(StgrayError):
    """A config file or option is malformed."""


class DataError(StgrayError):
    """A dataset is missing, unreadable or fails validation."""


class StoreError(StgrayError):
    """The artifact store cannot be reached or an artifact is missing."""

    exit_code = 3


class IntegrityError(StoreError):
    """A stored object does not match its manifest (size or checksum)."""
