"""Errors that tell the user which file is wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path


class CellarenaError(Exception):
    """Base error. ``where`` names the file (or object) at fault, ``fix`` says what to do."""

    def __init__(self, message: str, *, where: str | Path | None = None, fix: str | None = None):
        self.message = message
        self.where = str(where) if where is not None else None
        self.fix = fix
        parts = []
        if self.where:
            parts.append(f"{self.where}: ")
        parts.append(message)
        if fix:
            parts.append(f"\n  fix: {fix}")
        super().__init__("".join(parts))


class CardError(CellarenaError):
    """A dataset or model card does not validate. ``fields``: the card's top-level fields at fault,
    where the schema says which."""

    def __init__(self, message: str, *, where: str | Path | None = None, fix: str | None = None,
                 fields: tuple[str, ...] = ()):
        super().__init__(message, where=where, fix=fix)
        self.fields = tuple(fields)


class ChecksumError(CellarenaError):
    """Downloaded or extracted bytes do not match the card's sha256."""


class DataError(CellarenaError):
    """A prepared or raw dataset violates the canonical contract."""


class NotApplicable(Exception):
    """Raised by a plug-in (or the runner) when a model cannot run on this input.

    This is a status, not a failure: the result row says ``not_applicable`` with the reason.
    """
