"""TRL's GOLD script (trl/experimental/gold/gold.py) with gold underneath:

    python -m gold_pipeline.scripts.gold --model_name_or_path pkg:smollm2-135m-instruct \
        --teacher_model_name_or_path pkg:qwen2.5-coder-0.5b-instruct --dataset_name data/train.jsonl \
        --learning_rate 2e-5 --per_device_train_batch_size 4 --gradient_accumulation_steps 8 \
        --output_dir gold-model --num_train_epochs 1 --push_to_hub

is `gold train` with the same arguments: the same command function, option parsing (training/trl_args.py) and
error handling (exit 2 on bad input, 1 on a run that could not finish). `--config FILE` takes TRL's YAML layout.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Run `gold train` on argv (default: sys.argv[1:])."""
    import typer

    from gold_pipeline.cli.errors import guarded
    from gold_pipeline.cli.train import COMMAND, CONTEXT_SETTINGS

    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    app.command(context_settings=CONTEXT_SETTINGS)(guarded(COMMAND))
    app(args=None if argv is None else list(argv), prog_name="python -m gold_pipeline.scripts.gold")


if __name__ == "__main__":
    main()
