"""Errors a user can cause. The CLI prints them as one clear message, never a traceback."""

from __future__ import annotations


class PrefkitError(Exception):
    """A user-facing error: bad input, a missing package, a broken plugin."""


class RecipeError(PrefkitError):
    """A recipe that cannot be used. ``where`` names the file and ``problems`` the key paths."""

    def __init__(self, where: str, problems: list[tuple[str, str]]):
        self.where = where
        self.problems = problems
        lines = [f"{where}: invalid recipe"]
        lines += [f"  {path or '<top level>'}: {message}" for path, message in problems]
        super().__init__("\n".join(lines))


class DataError(PrefkitError):
    """A dataset that cannot be used; the message names the file, the row and the field."""
