"""A small rich progress bar with rows/s and tokens/s, shared by the long-running stages.

    with RateProgress("align", total=num_rows) as progress:
        progress.advance(rows=128, tokens=40_000)

Writes to stderr; when stderr is not a terminal (CI logs, pipes) it prints nothing while running and one
summary line at the end, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text


def _human(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class _RateColumn(ProgressColumn):
    """`<field>/s` from a counter kept in task.fields (rows use task.completed)."""

    def __init__(self, field: str, label: str):
        super().__init__()
        self.field, self.label = field, label

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        count = task.completed if self.field == "completed" else task.fields.get(self.field, 0)
        rate = count / elapsed if elapsed > 0 else 0.0
        return Text(f"{_human(count)} {self.label} ({_human(rate)}/s)", style="progress.data.speed")


class RateProgress:
    """Progress of rows and tokens with their rates; `advance` may be called from the main process only."""

    def __init__(self, description: str, *, total: int | None = None, unit: str = "rows",
                 disable: bool | None = None, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.interactive = self.console.is_terminal if disable is None else not disable
        self.description, self.unit = description, unit
        self.rows = 0
        self.tokens = 0
        self.started = time.perf_counter()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            _RateColumn("completed", unit),
            _RateColumn("tokens", "tokens"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.interactive,
            transient=False,
        )
        self.task = self.progress.add_task(description, total=total, tokens=0)

    def __enter__(self) -> "RateProgress":
        self.started = time.perf_counter()
        self.progress.start()
        return self

    def advance(self, rows: int = 0, tokens: int = 0) -> None:
        self.rows += rows
        self.tokens += tokens
        self.progress.update(self.task, advance=rows, tokens=self.tokens)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> str:
        seconds = max(self.elapsed, 1e-9)
        return (f"{self.description}: {self.rows} {self.unit} ({self.rows / seconds:.1f}/s), "
                f"{self.tokens} tokens ({_human(self.tokens / seconds)}/s) in {seconds:.1f} s")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.progress.stop()
        if not self.interactive and exc_type is None and self.console.file is not sys.stdout:
            self.console.print(self.summary(), highlight=False)
