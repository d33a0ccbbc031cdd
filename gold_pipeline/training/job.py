"""A training run as data: `TrainJob` (models, data, resume) + `GOLDConfig`, built from a YAML/JSON config
file and command-line overrides, and `run_train_job` (what `gold train` calls)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOB_KEYS = ("student", "teacher", "aligned", "dataset", "dataset_split", "eval_aligned", "eval_dataset",
            "eval_split", "resume_from_checkpoint")


@dataclass
class TrainJob:
    """What to train on and from where; every other setting is a GOLDConfig field.

    student: student model (local path, hub id or pkg: name). teacher: teacher model (optional when the
    aligned shards carry cached top-K and lmbda=0). aligned / eval_aligned: aligned-shard directories.
    dataset / eval_dataset: raw conversation files (jsonl/json/parquet with `messages` or `prompt`/`completion`),
    aligned on the fly. resume_from_checkpoint: a checkpoint directory, or "latest" for output_dir's last one.
    """

    student: str
    teacher: str | None = None
    aligned: str | None = None
    dataset: str | None = None
    dataset_split: str = "train"
    eval_aligned: str | None = None
    eval_dataset: str | None = None
    eval_split: str = "train"
    resume_from_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if not self.student:
            raise ValueError("train: `student` is required (a local path, hub id or pkg: name).")
        if (self.aligned is None) == (self.dataset is None):
            raise ValueError("train: give exactly one of `aligned` (a `gold align` output directory) or `dataset` "
                             "(a raw conversation file aligned on the fly).")
        if self.eval_aligned is not None and self.eval_dataset is not None:
            raise ValueError("train: give at most one of `eval_aligned` and `eval_dataset`.")


def load_config_file(path: str | Path | None) -> dict[str, Any]:
    """A YAML or JSON mapping of option names (dashes or underscores) to values."""
    if path is None:
        return {}
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of option names to values.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_job(options: dict[str, Any]) -> tuple[TrainJob, Any]:
    """Split merged options into a TrainJob and a GOLDConfig; unknown names are refused."""
    from gold_pipeline.training.config import GOLDConfig

    config_fields = {f.name for f in dataclasses.fields(GOLDConfig) if f.init}
    unknown = sorted(k for k in options if k not in config_fields and k not in JOB_KEYS)
    if unknown:
        raise ValueError(f"train: unknown option(s) {unknown}; options are the TrainJob keys {list(JOB_KEYS)} and "
                         "GOLDConfig fields (see `gold train --help`).")
    job = TrainJob(**{k: v for k, v in options.items() if k in JOB_KEYS})
    fields = {k: v for k, v in options.items() if k in config_fields}
    if job.teacher is not None:
        fields.setdefault("teacher_model_name_or_path", job.teacher)
    fields.setdefault("output_dir", "runs/gold")
    return job, GOLDConfig(**fields)


def _raw_dataset(path: str, split: str):
    import datasets

    suffix = Path(path).suffix.lower().lstrip(".")
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(suffix)
    if builder is None:
        return datasets.load_dataset(path, split=split)
    return datasets.load_dataset(builder, data_files=path, split="train")


def run_train_job(job: TrainJob, args) -> dict[str, Any]:
    """Train, save the final student to args.output_dir, write the resolved config next to it."""
    from gold_pipeline.training.trainer import GOLDTrainer

    train_data = job.aligned if job.aligned is not None else _raw_dataset(job.dataset, job.dataset_split)
    eval_data = job.eval_aligned or (_raw_dataset(job.eval_dataset, job.eval_split) if job.eval_dataset else None)
    trainer = GOLDTrainer(model=job.student, teacher_model=job.teacher, args=args, train_dataset=train_data,
                          eval_dataset=eval_data)
    out = Path(args.output_dir)
    if trainer.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gold_train_config.json").write_text(json.dumps(
            {"job": dataclasses.asdict(job), "args": json.loads(args.to_json_string())}, indent=2, default=str))
    resume = job.resume_from_checkpoint
    result = trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    trainer.save_model(str(out))
    trainer.processing_class.save_pretrained(str(out))
    return {"global_step": result.global_step, "training_loss": result.training_loss, "output_dir": str(out)}
