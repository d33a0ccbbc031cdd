"""Every error gold raises on purpose, in one place.

Two kinds, and the command line treats them differently (gold_pipeline.cli.errors):

- `GoldInputError` (exit code 2): the input or the options are wrong — a row, a file, a field, an output folder
  that already holds a run. The message names what is wrong and how to fix it.
- `GoldRuntimeError` (exit code 1): the input is fine but the run could not finish — a server that stopped
  answering, a worker process that died, a wait that timed out. The message says how to continue (usually the
  same command with `--resume`).

Both are sentences meant for the user; anything else that escapes is a bug and keeps its traceback.
`GoldInputError` is also a `ValueError` and `GoldRuntimeError` a `RuntimeError`, so code written against the
builtin types keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass


class GoldError(Exception):
    """Base of every error gold raises on purpose."""


class GoldInputError(GoldError, ValueError):
    """A problem with the user's input, options or an output folder; the message says what to do."""


class OutputExistsError(GoldInputError):
    """The output folder holds an earlier run and neither --resume nor --overwrite was given."""


class ManifestError(GoldInputError):
    """A manifest is missing, unreadable, or does not match what the consumer expects."""


@dataclass(frozen=True)
class InvalidRow:
    """A source row that failed validation (yielded in place of an Example by `data.sources.iter_parsed`)."""

    row_index: int
    reason: str  # a key of data.records.INVALID_REASONS
    field: str
    message: str


class InvalidRowError(GoldInputError):
    """An invalid source row, when invalid rows are not skipped; `.invalid` says which row and why."""

    def __init__(self, invalid: InvalidRow):
        super().__init__(invalid.message)
        self.invalid = invalid


class GoldRuntimeError(GoldError, RuntimeError):
    """A run that could not finish although its input is valid; the message says how to continue."""


class BackendUnavailable(GoldRuntimeError):
    """A teacher backend cannot run (missing optional dependency, server gone after retries): the run stops
    resumably."""


class WorkerFailedError(GoldRuntimeError):
    """A worker process of a stage died or failed; finished shards are kept and `--resume` continues."""


class StageTimeoutError(GoldRuntimeError):
    """A stage waited too long for another process (another rank, a server); `--resume` continues."""


class ClusterUnreachableError(GoldRuntimeError):
    """The compute cluster of `--executor ray` (at `--ray-address`) cannot be reached or joined in time."""
