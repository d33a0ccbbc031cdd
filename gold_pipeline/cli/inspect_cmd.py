"""`gold inspect DIR`: parse options, call gold_pipeline.recipes.inspect, print text or JSON."""

from __future__ import annotations

from pathlib import Path

import typer


def inspect(
    out: Path = typer.Argument(..., help="Output folder of `gold align` (or `gold teacher-cache`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    top: int = typer.Option(15, help="How many of the most frequent multi-token groups to show."),
    sample_rows: int = typer.Option(5000, help="Rows scanned for the most frequent multi-token groups."),
    tokenizers: bool = typer.Option(True, "--tokenizers/--no-tokenizers",
                                    help="Load the manifest's tokenizers to show groups as text."),
) -> None:
    """Rows, tokens per side, groups, multi-token group shares, exclusions, vocab-map overlap, projection coverage
    (all and numeral student tokens matched or projected, also weighed by occurrence), frequent groups."""
    from gold_pipeline.recipes.inspect import inspect_output, render_report, report_json

    report = inspect_output(out, top=top, sample_rows=sample_rows, load_tokenizers=tokenizers)
    typer.echo(report_json(report) if as_json else render_report(report))


COMMAND = inspect
