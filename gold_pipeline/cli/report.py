"""`gold report DIR`: parse options, call gold_pipeline.recipes.report, print the summary or the figures as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def report(
    folder: Path = typer.Argument(..., help="Output folder of `gold train`, `gold align` or `gold teacher-cache`."),
    out: Optional[Path] = typer.Option(None, "--out", help="The PNG to write (default: DIR/report.png)."),
    html: bool = typer.Option(True, "--html/--no-html", help="Also write a self-contained HTML page next to the "
                              "PNG (same name, .html; default DIR/report.html)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures (table and plotted series) as JSON."),
) -> None:
    """Draw a PNG (and an HTML page) of a training run's metrics or of an aligned / teacher-cache folder."""
    from gold_pipeline.recipes.report import format_result, write_report

    result = write_report(folder, png=out, html_page=html)
    typer.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) if as_json else format_result(result))


COMMAND = report
