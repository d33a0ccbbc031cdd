"""The `gold` command line: thin typer commands over `gold_pipeline`."""
