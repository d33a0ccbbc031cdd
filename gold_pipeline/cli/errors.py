"""The one way every `gold` command ends on a documented failure: a short message on stderr, no traceback.

    exit 2  bad input: gold_pipeline.errors.GoldInputError (a row, a file, a field, an option, an output folder
            holding a run) and missing/unreadable files (OSError)
    exit 1  a run that could not finish: GoldRuntimeError (a timeout, a worker process that died, a server gone)
    exit 130  interrupted (Ctrl-C): finished shards are kept, `--resume` continues

`gold --debug ...` (or GOLD_DEBUG=1) re-raises instead, to show the traceback. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import typer

from gold_pipeline.errors import GoldInputError, GoldRuntimeError

INPUT_ERROR_EXIT = 2
RUNTIME_ERROR_EXIT = 1
INTERRUPTED_EXIT = 130
DEBUG_ENV = "GOLD_DEBUG"


_debug_flag = False  # --debug of this invocation (the app's callback sets it)


def set_debug(debug: bool) -> None:
    global _debug_flag
    _debug_flag = debug


def _debug() -> bool:
    return _debug_flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _exit(message: str, code: int, error: BaseException) -> None:
    if _debug():
        raise error
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=code)


def _os_message(error: OSError) -> str:
    if error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}. Check the path and its permissions."
    return str(error)


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command function so that documented failures end with a message and their exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except GoldInputError as error:
            _exit(str(error), INPUT_ERROR_EXIT, error)
        except GoldRuntimeError as error:
            _exit(str(error), RUNTIME_ERROR_EXIT, error)
        except OSError as error:
            _exit(_os_message(error), INPUT_ERROR_EXIT, error)
        except KeyboardInterrupt as error:
            _exit("interrupted. Finished shards are kept: rerun the same command with --resume to continue.",
                  INTERRUPTED_EXIT, error)

    return wrapper
