"""What the engine tells a user interface while it works (library code never prints).

A run, a sample, an evaluation or a compare reports through an object with these calls; the CLI's
three output modes (``prefkit.ui``: rich, ``--quiet``, ``--json``) are three such objects, and the
library's default is :class:`SilentReporter`, which shows nothing.
"""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    """The calls a reporter takes. ``checkpoint(step, path)`` is optional: called after each
    checkpoint is written, when the reporter has it."""

    def message(self, text: str) -> None: ...
    def start(self, total_steps: int, first_step: int, description: str = "train") -> None: ...
    def step(self, step: int, metrics: dict[str, float]) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    """Shows nothing: the library's default, and the base of reporters that show only part."""

    def message(self, text: str) -> None:
        pass

    def start(self, total_steps: int, first_step: int, description: str = "train") -> None:
        pass

    def step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def checkpoint(self, step: int, path: str) -> None:
        pass

    def finish(self) -> None:
        pass
