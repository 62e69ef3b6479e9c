"""Errors that the command line reports as one clear line (no traceback)."""

from __future__ import annotations


class XdpoError(Exception):
    """Base class: the message is shown to the user as is."""


class ConfigError(XdpoError, ValueError):
    """A config key is unknown, has the wrong type, or an impossible value."""


class DataError(XdpoError, ValueError):
    """A data file, column or row is missing or malformed."""


class BadRowError(DataError):
    """One row of the preference data is unusable; the message names file, row, column and what was expected.

    Constructible from the message alone, so it survives pickling and DataLoader workers.
    """

    def __init__(self, message: str, *, row: int | None = None, column: str = "") -> None:
        super().__init__(message)
        self.row, self.column = row, column

    @classmethod
    def at(cls, where: str, row: int, column: str, expected: str, got: str, note: str = "") -> BadRowError:
        """`{where}, column {column}: expected {expected}, got {got}{note}`; `where` names file and row."""
        return cls(f"{where}, column {column}: expected {expected}, got {got}{note}", row=row, column=column)
