"""How every `gold` command reports a user error: one red sentence on stderr and exit code 1, no traceback
(GOLD_DEBUG=1 re-raises to show it)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import typer

# Input errors of the library are ValueError subclasses (GoldInputError, ManifestError, ...) or file errors.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def fail(error: Exception) -> None:
    """Print an input error as one sentence (no traceback) and exit 1; GOLD_DEBUG=1 shows the traceback."""
    if os.environ.get("GOLD_DEBUG"):
        raise error
    typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)


@contextmanager
def user_errors() -> Iterator[None]:
    """Run a command body, turning library input errors into `fail`."""
    try:
        yield
    except USER_ERRORS as error:
        fail(error)
