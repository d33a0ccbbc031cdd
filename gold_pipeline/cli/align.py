"""`gold align`: parse options, build AlignConfig, call gold_pipeline.align.job.run_align."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gold_pipeline.cli.executor_options import executor_option, ray_address_option


def align(
    dataset: Optional[str] = typer.Option(None, help="Rows: .jsonl/.json/.parquet file or glob, data folder, hub "
                                                     "dataset id, or a `gold teacher-cache` output folder."),
    student_tokenizer: str = typer.Option(..., help="Student tokenizer: pkg: name, local dir or hub id."),
    teacher_tokenizer: Optional[str] = typer.Option(None, help="Teacher tokenizer (default with --teacher-cache: "
                                                               "the cache's)."),
    out: Path = typer.Option(..., help="Output folder: part-XXXXX.parquet, vocab_map/, manifest.json."),
    teacher_cache: Optional[Path] = typer.Option(None, help="Use a `gold teacher-cache` output as the rows "
                                                            "(keeps the teacher's ids and top-k)."),
    split: str = typer.Option("train", help="Dataset split."),
    dataset_config: Optional[str] = typer.Option(None, help="Hub dataset configuration name."),
    student_tokenizer_revision: Optional[str] = typer.Option(None, help="Hub revision of the student tokenizer."),
    teacher_tokenizer_revision: Optional[str] = typer.Option(None, help="Hub revision of the teacher tokenizer."),
    student_chat_template: Optional[Path] = typer.Option(None, help="Jinja chat template file for the student."),
    teacher_chat_template: Optional[Path] = typer.Option(None, help="Jinja chat template file for the teacher."),
    shard_size: int = typer.Option(1000, help="Source rows per shard (shard k = rows [k*S, (k+1)*S))."),
    num_workers: int = typer.Option(1, help="Worker processes (1 = in this process); with --executor ray: Ray "
                                            "workers (CPUs) used at once."),
    executor: str = executor_option("one Ray task per shard"),
    ray_address: Optional[str] = ray_address_option(),
    max_length: Optional[int] = typer.Option(None, help="Max prompt+completion tokens per side."),
    overlong: str = typer.Option("truncate", help="Rows over --max-length: truncate (at a common group "
                                                  "boundary) | skip. Both are counted in the manifest."),
    resume: bool = typer.Option(False, help="Finish an interrupted run (finished shards are kept)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    skip_invalid: bool = typer.Option(False, help="Skip invalid rows (counted per reason) instead of stopping."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: when "
                                                                                   "stderr is a terminal)."),
) -> None:
    """Tokenize prompts and completions for both tokenizers, align completions byte-exactly, write Parquet."""
    from gold_pipeline.align.config import AlignConfig
    from gold_pipeline.align.job import run_align

    cfg = AlignConfig(
        out=str(out), student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer,
        dataset=dataset, teacher_cache=str(teacher_cache) if teacher_cache else None, split=split,
        dataset_config=dataset_config, student_tokenizer_revision=student_tokenizer_revision,
        teacher_tokenizer_revision=teacher_tokenizer_revision,
        student_chat_template=str(student_chat_template) if student_chat_template else None,
        teacher_chat_template=str(teacher_chat_template) if teacher_chat_template else None,
        shard_size=shard_size, num_workers=num_workers, executor=executor, ray_address=ray_address,
        max_length=max_length, overlong=overlong,
        resume=resume, overwrite=overwrite, skip_invalid=skip_invalid, progress=progress,
    )
    stats = run_align(cfg)
    student, teacher = stats.get("student", {}), stats.get("teacher", {})
    typer.echo(
        f"wrote {stats.get('rows', 0)} rows to {out}: {student.get('completion_tokens', 0)} student / "
        f"{teacher.get('completion_tokens', 0)} teacher completion tokens, {stats.get('groups', 0)} groups, "
        f"status {stats.get('rows_by_status', {})}, invalid {stats.get('invalid', {})}, "
        f"skipped {stats.get('skipped', {})}, truncated {stats.get('truncated_rows', 0)}. "
        f"Next: gold inspect {out}"
    )


COMMAND = align
