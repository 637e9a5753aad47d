"""One rich progress bar style for long work (weight loading, generation), on stderr so stdout stays data."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn


class ProgressBar:
    def __init__(self, description: str, total: int):
        self.p = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), transient=True, console=Console(stderr=True))
        self.task = self.p.add_task(description, total=total)
        self.p.start()

    def advance(self, n: int = 1) -> None:
        self.p.advance(self.task, n)

    def stop(self) -> None:
        self.p.stop()
