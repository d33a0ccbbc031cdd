"""Entry point of the `gold` command (console script) and `python -m gold_pipeline.cli`.

Each command lives in its own module and only parses options, builds the library's config dataclass and calls
the library; `errors.guarded` (applied here, to every command) turns documented failures into exit codes.
"""

import importlib

import typer

from gold_pipeline.cli.errors import guarded, set_debug

app = typer.Typer(
    name="gold",
    help="Cross-tokenizer on-policy distillation (GOLD): teacher-cache -> align -> train.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

COMMANDS = {"teacher-cache": "teacher_cache", "align": "align", "train": "train", "inspect": "inspect_cmd",
            "report": "report", "demo": "demo"}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", envvar="GOLD_DEBUG",
                                    help="Show the full traceback of a failure.")) -> None:
    """Cross-tokenizer on-policy distillation (GOLD): teacher-cache -> align -> train."""
    set_debug(debug)


for _name, _module in COMMANDS.items():
    _mod = importlib.import_module(f"gold_pipeline.cli.{_module}")
    # CONTEXT_SETTINGS: `gold train` lets TRL-style --field_name flags through to its own parser
    app.command(_name, context_settings=getattr(_mod, "CONTEXT_SETTINGS", None))(guarded(_mod.COMMAND))

if __name__ == "__main__":
    app()
