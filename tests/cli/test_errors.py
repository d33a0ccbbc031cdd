"""One CLI wrapper: bad input exits 2, a run that could not finish exits 1, neither prints a traceback unless
--debug."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from gold_pipeline.cli.errors import guarded
from gold_pipeline.errors import GoldInputError, StageTimeoutError, WorkerFailedError


def _app(error: BaseException) -> typer.Typer:
    from gold_pipeline.cli.main import main

    app = typer.Typer()
    app.callback()(main)

    def boom() -> None:
        raise error

    app.command("boom")(guarded(boom))
    return app


@pytest.mark.parametrize("error,code", [
    (GoldInputError("Row 3 of x.jsonl: field `messages` is missing. Give each row messages."), 2),
    (FileNotFoundError(2, "No such file or directory", "data.jsonl"), 2),
    (StageTimeoutError("Timed out after 5 s waiting for rank 0; rerun with --resume."), 1),
    (WorkerFailedError("An align worker process died; rerun with --resume."), 1),
])
def test_documented_failures_exit_with_a_sentence_and_no_traceback(error, code, monkeypatch):
    # regression: each command caught its own list of errors, so a teacher-cache timeout or a worker failure
    # ended in a traceback
    monkeypatch.delenv("GOLD_DEBUG", raising=False)
    result = CliRunner().invoke(_app(error), ["boom"])
    assert result.exit_code == code
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    message = str(error) if not isinstance(error, OSError) else "data.jsonl: No such file or directory"
    assert message.split(";")[0] in result.output


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.delenv("GOLD_DEBUG", raising=False)
    result = CliRunner().invoke(_app(GoldInputError("bad option")), ["--debug", "boom"])
    assert isinstance(result.exception, GoldInputError)
    assert CliRunner().invoke(_app(GoldInputError("bad option")), ["boom"]).exit_code == 2  # not sticky


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("GOLD_DEBUG", raising=False)
    result = CliRunner().invoke(_app(ZeroDivisionError("bug")), ["boom"])
    assert isinstance(result.exception, ZeroDivisionError)
