"""A small rich progress bar with rows/s, tokens/s and the time left, shared by the long-running stages
(`gold align`, `gold teacher-cache`; `gold train` shows transformers' own step bar with its ETA).

    with RateProgress("align", total=num_rows) as progress:
        progress.advance(rows=128, tokens=40_000)

Writes to stderr; when stderr is not a terminal (CI logs, pipes) it prints one status line every `log_every`
seconds (rows, tokens, rates, ETA) and one summary line at the end, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


def _human(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def format_duration(seconds: float) -> str:
    """h:mm:ss (or m:ss under an hour)."""
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_seconds(done: float, total: float | None, rate: float) -> float | None:
    """Seconds left at `rate` units/s; None when the total or the rate is unknown."""
    if total is None or rate <= 0:
        return None
    return max(total - done, 0.0) / rate


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
                 disable: bool | None = None, console: Console | None = None, log_every: float = 60.0):
        self.console = console or Console(stderr=True)
        self.interactive = self.console.is_terminal if disable is None else not disable
        self.log_lines = disable is None and not self.interactive  # disabled on purpose: silent until the end
        self.description, self.unit, self.total = description, unit, total
        self.rows = 0
        self.tokens = 0
        self.log_every = log_every
        self.started = time.perf_counter()
        self._last_log = (self.started, 0)  # (time, rows) of the last status line
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            _RateColumn("completed", unit),
            _RateColumn("tokens", "tokens"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.interactive,
            transient=False,
        )
        self.task = self.progress.add_task(description, total=total, tokens=0)

    def __enter__(self) -> "RateProgress":
        self.started = time.perf_counter()
        self._last_log = (self.started, 0)
        self.progress.start()
        return self

    def advance(self, rows: int = 0, tokens: int = 0) -> None:
        self.rows += rows
        self.tokens += tokens
        self.progress.update(self.task, advance=rows, tokens=self.tokens)
        now = time.perf_counter()
        if self.log_lines and now - self._last_log[0] >= self.log_every:
            self.console.print(self.status(now), highlight=False)
            self._last_log = (now, self.rows)

    def status(self, now: float | None = None) -> str:
        """One line: rows (of the total), tokens, rates, and the time left at the rate since the last line (rows
        skipped at the start of a resumed run then do not count as speed)."""
        now = time.perf_counter() if now is None else now
        since, rows_then = self._last_log
        rate = (self.rows - rows_then) / max(now - since, 1e-9)
        left = eta_seconds(self.rows, self.total, rate)
        of = f"/{self.total}" if self.total is not None else ""
        elapsed = max(now - self.started, 1e-9)
        return (f"{self.description}: {self.rows}{of} {self.unit} ({rate:.1f}/s), {_human(self.tokens)} tokens "
                f"({_human(self.tokens / elapsed)}/s), {format_duration(now - self.started)} elapsed, eta "
                f"{format_duration(left) if left is not None else '?'}")

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
