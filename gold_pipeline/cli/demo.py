"""`gold demo` (what `make demo` runs): the whole pipeline offline on the embedded default pair."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder (stage folders, summary.json, report.png)."),
    teacher: str = typer.Option("pkg:smollm2-135m-instruct", help="Teacher model: pkg: name, local dir or hub id."),
    student_tokenizer: str = typer.Option("pkg:mistral-sp-v1", help="Vocabulary of the fresh student."),
    student_model: Optional[str] = typer.Option(None, help="Start from this student checkpoint instead."),
    train_prompts: Optional[Path] = typer.Option(None, help="Train prompts jsonl (default: the packaged "
                                                            "demo train.jsonl)."),
    heldout_prompts: Optional[Path] = typer.Option(None, help="Held-out prompts jsonl (default: the "
                                                              "packaged demo heldout.jsonl)."),
    max_train_prompts: Optional[int] = typer.Option(None, help="Use only the first N train prompts."),
    max_heldout_prompts: Optional[int] = typer.Option(None, help="Use only the first N held-out prompts."),
    max_new_tokens: int = typer.Option(64, help="Teacher completion length."),
    top_k: int = typer.Option(16, help="Cached teacher log-probs per token."),
    teacher_batch_size: int = typer.Option(16, help="Prompts per teacher generation batch."),
    steps: int = typer.Option(200, help="Off-policy steps from the cached top-K."),
    mixed_steps: int = typer.Option(10, help="Then this many mixed on/off-policy steps (teacher runs live)."),
    lmbda: float = typer.Option(0.5, help="On-policy share of the mixed steps."),
    batch_size: int = typer.Option(4, help="Rows per optimizer step."),
    learning_rate: float = typer.Option(1e-3, help="Learning rate."),
    seed: int = typer.Option(0, help="Seed of the student, the teacher samples and the data order."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: 1 when the load average exceeds "
                                                     "the core count, else torch's default)."),
    overwrite: bool = typer.Option(True, "--overwrite/--no-overwrite", help="Replace a previous demo in OUT."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Teacher-cache -> align -> train -> eval on SmolLM2-135M-Instruct -> a fresh Mistral-vocabulary student."""
    options = dict(locals())
    from gold_pipeline.recipes.demo import DemoConfig, format_summary, run_demo

    options.pop("as_json")
    for name in ("train_prompts", "heldout_prompts"):
        if options[name] is None:
            options.pop(name)
        else:
            options[name] = str(options[name])
    summary = run_demo(DemoConfig(**options))
    typer.echo(json.dumps(summary) if as_json else format_summary(summary))


COMMAND = demo
