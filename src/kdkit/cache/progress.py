"""The progress bar of a cache build: samples done, samples/s and ETA, on a terminal's stderr."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _Rate(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"? {self.unit}/s" if speed is None else f"{speed:,.0f} {self.unit}/s")


class BuildProgress:
    """``with BuildProgress(total, enabled) as bar: bar.advance(rows)``; silent when disabled.

    ``unit`` names the rows in the rate column (``samples/s``, ``tokens/s``).

    Shown only when ``enabled`` and stderr is a terminal: a log file or a pipe gets no
    carriage-return noise (the build logs when it starts, resumes and ends instead).
    """

    def __init__(
        self,
        total: int,
        enabled: bool,
        description: str = "teacher cache",
        unit: str = "samples",
    ) -> None:
        self._bar: Progress | None = None
        if enabled and total > 0 and sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(unit),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
            )
            self._task = self._bar.add_task(description, total=total)

    def __enter__(self) -> BuildProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def advance(self, rows: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, rows)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
