"""Entry point of the `gold` command (console script) and `python -m cli.main`.

Each command lives in its own module and only parses options, builds the library's config
dataclass and calls the library.
"""

import typer

app = typer.Typer(
    name="gold",
    help="Cross-tokenizer on-policy distillation (GOLD): teacher-cache -> align -> train.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _register() -> None:
    import importlib

    for module_name in ("align", "inspect_cmd", "teacher_cache", "train", "demo"):
        try:
            module = importlib.import_module(f"cli.{module_name}")
        except ModuleNotFoundError as error:  # a command module not written yet
            if error.name != f"cli.{module_name}":
                raise
            continue
        module.register(app)


_register()

if __name__ == "__main__":
    app()
