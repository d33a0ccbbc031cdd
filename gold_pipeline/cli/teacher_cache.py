"""`gold teacher-cache`: parse options, build TeacherCacheConfig, call the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from gold_pipeline.cli.executor_options import executor_option, ray_address_option


def teacher_cache(
    dataset: str = typer.Option(..., help="Prompts: jsonl/json/parquet file, hub dataset id or folder."),
    teacher: str = typer.Option(..., help="Teacher model: hub id, local folder, pkg: name; openai: served name."),
    out: Path = typer.Option(..., help="Output folder (part-XXXXX.parquet + manifest.json)."),
    split: str = typer.Option("train", help="Dataset split."),
    teacher_revision: Optional[str] = typer.Option(None, help="Model revision (hub)."),
    teacher_tokenizer: Optional[str] = typer.Option(None, help="Tokenizer, if not the teacher's own."),
    chat_template: Optional[Path] = typer.Option(None, help="File with a chat template overriding the tokenizer's."),
    backend: str = typer.Option("hf", help="hf | vllm | openai."),
    top_k: int = typer.Option(64, help="Top-K log-probs stored per completion token (0 = completions only)."),
    num_generations: int = typer.Option(1, help="Samples per prompt."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    sampling_top_k: int = typer.Option(0, help="Sample only among the k most likely tokens (0 = off)."),
    seed: int = typer.Option(0, help="Run seed; every sample is seeded from (seed, sample_id)."),
    max_new_tokens: int = typer.Option(256, help="Maximum completion tokens."),
    score_only: bool = typer.Option(False, help="Keep the dataset's completions; store teacher log-probs of them."),
    max_examples: Optional[int] = typer.Option(None, help="Use only the first N dataset rows."),
    skip_invalid: bool = typer.Option(False, help="Count and skip bad rows instead of stopping."),
    batch_size: int = typer.Option(8, help="Prompts per batch (hf)."),
    rows_per_shard: int = typer.Option(256, help="Prompts per shard."),
    resume: bool = typer.Option(False, help="Finish an interrupted run (finished shards are kept)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    dtype: str = typer.Option("auto", help="Model weights dtype: auto | float32 | bfloat16 | float16."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (hf)."),
    max_context: Optional[int] = typer.Option(None, help="Context limit for prompt+completion (default: model's)."),
    num_workers: int = typer.Option(1, help="Local data-parallel worker processes (hf); with --executor ray: Ray "
                                            "actors, each holding one backend."),
    executor: str = executor_option("an actor pool, one task per shard"),
    ray_address: Optional[str] = ray_address_option(),
    tensor_parallel_size: int = typer.Option(1, help="vllm: GPUs per model."),
    gpu_memory_utilization: float = typer.Option(0.9, help="vllm: fraction of GPU memory."),
    max_model_len: Optional[int] = typer.Option(None, help="vllm: maximum sequence length."),
    model_impl: str = typer.Option("auto", help="vllm: auto | vllm | transformers."),
    base_url: Optional[str] = typer.Option(None, help="openai: server base URL, e.g. http://127.0.0.1:8000/v1."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="openai: env variable holding the API key."),
    concurrency: int = typer.Option(4, help="openai: requests in flight."),
    request_timeout_s: float = typer.Option(300.0, help="openai: seconds per request."),
    max_retries: int = typer.Option(5, help="openai: retries per request before a resumable stop."),
    prompt_format: str = typer.Option("auto", help="openai: send prompts as ids | text | auto."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Generate teacher completions (or score given ones) and store per-token top-K teacher log-probs."""
    options = dict(locals())
    from gold_pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

    options["chat_template"] = str(chat_template) if chat_template else None
    summary = run_teacher_cache(TeacherCacheConfig(**options))
    typer.echo(json.dumps({k: summary[k] for k in ("out", "rows", "teacher_tokens", "num_shards", "seconds",
                                                   "new_tokens_per_s") if k in summary}))


COMMAND = teacher_cache
