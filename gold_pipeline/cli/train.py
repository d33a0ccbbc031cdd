"""`gold train`: merge --config FILE with the command-line options, build TrainJob + GOLDConfig, train.

Every option (and every GOLDConfig field, via the file or --set KEY=VALUE) can come from a YAML/JSON file;
options given on the command line win. TRL's GOLD script command line runs unchanged: the options below are
gold's dashed spellings, and everything else on the command line (`--model_name_or_path`, `--dataset_name`,
`--dtype`, any GOLDConfig/TrainingArguments field as `--field_name`, ...) is parsed by training/trl_args.py;
the command must be registered with CONTEXT_SETTINGS so that those reach it.
Multi-process: `accelerate launch --num_processes 2 -m gold_pipeline.cli train ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

# Let click hand the TRL-style options (underscored names, every GOLDConfig field) to trl_args.parse_argv.
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def train(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file of options (any option below, any GOLDConfig "
                                                     "field); command-line options override it."),
    student: Optional[str] = typer.Option(None, help="Student model: local path, hub id or pkg: name."),
    teacher: Optional[str] = typer.Option(None, help="Teacher model (not needed with cached top-K and lmbda=0)."),
    aligned: Optional[str] = typer.Option(None, help="Aligned-shard directory from `gold align` (streamed)."),
    dataset: Optional[str] = typer.Option(None, help="Raw conversations (.jsonl/.json/.parquet), aligned on the fly."),
    eval_aligned: Optional[str] = typer.Option(None, help="Aligned-shard directory for evaluation (bits per byte)."),
    eval_dataset: Optional[str] = typer.Option(None, help="Raw conversation file for evaluation."),
    output_dir: Optional[str] = typer.Option(None, help="Checkpoints, metrics.jsonl and the final student."),
    teacher_tokenizer: Optional[str] = typer.Option(None, "--teacher-tokenizer",
                                                    help="Teacher tokenizer (default: the teacher model's)."),
    use_uld_loss: Optional[bool] = typer.Option(None, "--use-uld-loss/--no-use-uld-loss",
                                                help="Cross-tokenizer ULD loss (else generalized JSD)."),
    uld_use_hybrid_loss: Optional[bool] = typer.Option(None, "--uld-use-hybrid-loss/--no-uld-use-hybrid-loss",
                                                       help="JSD on matched vocabulary + ULD on the rest."),
    uld_use_projection_loss: Optional[bool] = typer.Option(
        None, "--uld-use-projection-loss/--no-uld-use-projection-loss",
        help="Hybrid + chain-rule projection of the teacher onto student tokens spelling 2-4 teacher tokens."),
    uld_projection_weight: Optional[float] = typer.Option(None, help="Weight of the projected part (default: the "
                                                                     "matched weight)."),
    uld_projection_exclusive: Optional[bool] = typer.Option(
        None, "--uld-projection-exclusive/--no-uld-projection-exclusive",
        help="Count each string once: a student token on the teacher's path keeps only the mass its projectable "
             "extensions do not take (default on)."),
    uld_loss_mode: Optional[str] = typer.Option(None, help="ULD sort: exact (default) | fast."),
    lmbda: Optional[float] = typer.Option(None, help="On-policy probability per slice of the optimizer window."),
    beta: Optional[float] = typer.Option(None, help="Generalized JSD beta."),
    seq_kd: Optional[bool] = typer.Option(None, "--seq-kd/--no-seq-kd", help="Sequence-level KD off-policy."),
    max_completion_length: Optional[int] = typer.Option(None, help="Max completion tokens."),
    learning_rate: Optional[float] = typer.Option(None, help="Learning rate."),
    per_device_train_batch_size: Optional[int] = typer.Option(None, help="Rows per micro-batch per process."),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides epochs)."),
    num_train_epochs: Optional[float] = typer.Option(None, help="Epochs."),
    logging_steps: Optional[float] = typer.Option(None, help="Log every N steps."),
    save_steps: Optional[float] = typer.Option(None, help="Checkpoint every N steps."),
    eval_steps: Optional[float] = typer.Option(None, help="Evaluate every N steps (sets eval_strategy=steps)."),
    seed: Optional[int] = typer.Option(None, help="Seed."),
    use_peft: Optional[bool] = typer.Option(None, "--use-peft/--no-use-peft", help="Train LoRA adapters."),
    report_to: Optional[str] = typer.Option(None, help="Logging integrations, e.g. tensorboard or none."),
    resume_from_checkpoint: Optional[str] = typer.Option(None, help="Checkpoint directory, or `latest`."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite",
                                             help="Replace the earlier run in --output-dir (else it is refused)."),
    use_cpu: Optional[bool] = typer.Option(None, "--use-cpu/--no-use-cpu", help="Train on CPU."),
    teacher_server_url: Optional[str] = typer.Option(
        None, help="Serve the teacher: base URL of an OpenAI-compatible server (vLLM, SGLang, llama.cpp), e.g. "
                   "http://127.0.0.1:8000/v1, that scores completions instead of an in-process teacher."),
    teacher_server_model: Optional[str] = typer.Option(None, help="Model name on the teacher server (default: the "
                                                                  "one it lists)."),
    teacher_server_top_k: Optional[int] = typer.Option(None, help="Teacher alternatives per position (K, default "
                                                                  "16)."),
    teacher_server_timeout: Optional[float] = typer.Option(None, help="Seconds per teacher-server request."),
    teacher_server_retries: Optional[int] = typer.Option(None, help="Retries before training stops resumably."),
    teacher_server_probe: Optional[str] = typer.Option(None, help="Startup check: auto | tokens | off."),
    teacher_server_alignment: Optional[str] = typer.Option(None, help="Echoed log-probs: auto | aligned | shifted."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE for any GOLDConfig field (repeatable; "
                                                                 "VALUE parsed as YAML)."),
) -> None:
    """Distill the teacher into the student (GOLD): aligned shards or raw conversations + on-policy rollouts.

    Also TRL's GOLD script options, unchanged: --model_name_or_path,
    --dataset_name, --dtype, ... and every GOLDConfig field as --field_name
    (README: "Coming from TRL"). --config takes TRL's YAML layout too.
    """
    from gold_pipeline.training.job import build_job, run_train_job
    from gold_pipeline.training.trl_args import train_options

    given = dict(
        student=student, teacher=teacher, aligned=aligned, dataset=dataset, eval_aligned=eval_aligned,
        eval_dataset=eval_dataset, output_dir=output_dir, teacher_tokenizer_name_or_path=teacher_tokenizer,
        use_uld_loss=use_uld_loss, uld_use_hybrid_loss=uld_use_hybrid_loss, uld_loss_mode=uld_loss_mode,
        uld_use_projection_loss=uld_use_projection_loss, uld_projection_weight=uld_projection_weight,
        uld_projection_exclusive=uld_projection_exclusive, lmbda=lmbda, beta=beta, seq_kd=seq_kd,
        max_completion_length=max_completion_length,
        learning_rate=learning_rate, per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, max_steps=max_steps,
        num_train_epochs=num_train_epochs, logging_steps=logging_steps, save_steps=save_steps,
        eval_steps=eval_steps, seed=seed, use_peft=use_peft, report_to=report_to,
        resume_from_checkpoint=resume_from_checkpoint, use_cpu=use_cpu, overwrite=overwrite,
        teacher_server_url=teacher_server_url, teacher_server_model=teacher_server_model,
        teacher_server_top_k=teacher_server_top_k, teacher_server_timeout=teacher_server_timeout,
        teacher_server_retries=teacher_server_retries, teacher_server_probe=teacher_server_probe,
        teacher_server_alignment=teacher_server_alignment,
    )
    options = train_options(config=config, command_line=given, argv=ctx.args, set_items=set_ or [])
    job, args = build_job(options)
    result = run_train_job(job, args)
    typer.echo(f"trained {result['global_step']} steps (mean loss {result['training_loss']:.4f}); student saved "
               f"to {result['output_dir']}")


COMMAND = train
