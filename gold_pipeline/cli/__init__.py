"""The `gold` command line (typer): one module per command, `main.app` is the console script."""
