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


def test_eta_and_duration():
    from gold_pipeline.progress import eta_seconds, format_duration

    assert eta_seconds(30, 100, rate=7.0) == 10.0
    assert eta_seconds(120, 100, rate=7.0) == 0.0
    assert eta_seconds(30, None, rate=7.0) is None and eta_seconds(30, 100, rate=0.0) is None
    assert [format_duration(s) for s in (0, 59.6, 61, 3600 + 62)] == ["0:00", "1:00", "1:01", "1:01:02"]


def test_log_mode_prints_status_lines_with_eta_at_the_recent_rate(monkeypatch):
    import gold_pipeline.progress as progress_module

    now = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    buffer = io.StringIO()
    with RateProgress("teacher-cache", total=100, console=Console(file=buffer, force_terminal=False),
                      log_every=10.0) as progress:
        for at, rows in ((10.0, 50), (20.0, 10), (25.0, 5)):
            now[0] = at
            progress.advance(rows=rows, tokens=100 * rows)
    lines = buffer.getvalue().splitlines()
    # t=10: 50 rows in 10 s (e.g. shards a resumed run skips); t=20: 10 rows in the last 10 s, 40 left at 1/s;
    # t=25: under log_every since the last line, no line; then the summary line
    assert lines[0].startswith("teacher-cache: 50/100 rows (5.0/s), 5.0k tokens") and lines[0].endswith("eta 0:10")
    assert lines[1].startswith("teacher-cache: 60/100 rows (1.0/s)") and lines[1].endswith("eta 0:40")
    assert len(lines) == 3 and lines[2].startswith("teacher-cache: 65 rows (2.6/s)")


def test_disabled_progress_prints_no_status_lines():
    buffer = io.StringIO()
    with RateProgress("align", total=10, disable=True, console=Console(file=buffer), log_every=0.0) as progress:
        progress.advance(rows=4, tokens=10)
    assert buffer.getvalue().count("\n") == 1  # the summary only
