"""The shared progress helper counts rows and tokens and prints one summary line when not on a terminal."""

import io

from rich.console import Console

from gold_pipeline.progress import RateProgress, _human


def test_counts_rates_and_summary_line():
    buffer = io.StringIO()
    with RateProgress("align", total=10, console=Console(file=buffer, force_terminal=False)) as progress:
        progress.advance(rows=4, tokens=1500)
        progress.advance(rows=6, tokens=2500)
    assert (progress.rows, progress.tokens) == (10, 4000)
    text = buffer.getvalue()
    assert text.startswith("align: 10 rows (") and "4000 tokens (" in text and text.count("\n") == 1


def test_terminal_mode_renders_rates():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with RateProgress("align", total=None, console=console) as progress:
        progress.advance(rows=3, tokens=2_000_000)
        progress.progress.refresh()
    assert "tokens" in buffer.getvalue() and "2.0M" in buffer.getvalue()


def test_human_units():
    assert [_human(x) for x in (12, 1234, 5_600_000, 7e9)] == ["12", "1.2k", "5.6M", "7.0G"]
