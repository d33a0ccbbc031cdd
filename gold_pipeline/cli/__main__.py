"""`python -m gold_pipeline.cli ...` runs the `gold` command."""

from gold_pipeline.cli.main import app

app(prog_name="gold")
