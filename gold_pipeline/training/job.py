"""A training run as data: `TrainJob` (models, data, resume) + `GOLDConfig`, built from a YAML/JSON config
file and command-line overrides, and `run_train_job` (what `gold train` calls)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gold_pipeline.errors import GoldInputError, OutputExistsError

JOB_KEYS = ("student", "teacher", "aligned", "dataset", "dataset_split", "eval_aligned", "eval_dataset",
            "eval_split", "resume_from_checkpoint", "overwrite")
CONFIG_FILE = "gold_train_config.json"  # written into output_dir by every run: marks the folder as a gold run


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
    overwrite: bool = False  # replace the earlier run in output_dir

    def __post_init__(self) -> None:
        if not self.student:
            raise GoldInputError("train: `student` is required (a local path, hub id or pkg: name).")
        if (self.aligned is None) == (self.dataset is None):
            raise GoldInputError("train: give exactly one of `aligned` (a `gold align` output directory) or `dataset` "
                                  "(a raw conversation file aligned on the fly).")
        if self.eval_aligned is not None and self.eval_dataset is not None:
            raise GoldInputError("train: give at most one of `eval_aligned` and `eval_dataset`.")
        if self.overwrite and self.resume_from_checkpoint is not None:
            raise GoldInputError("train: --overwrite and --resume-from-checkpoint exclude each other: pick one.")


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
        raise GoldInputError(f"{path}: a config file must hold a mapping of option names to values.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_job(options: dict[str, Any]) -> tuple[TrainJob, Any]:
    """Split merged options into a TrainJob and a GOLDConfig; unknown names are refused."""
    from gold_pipeline.training.config import GOLDConfig

    config_fields = {f.name for f in dataclasses.fields(GOLDConfig) if f.init}
    unknown = sorted(k for k in options if k not in config_fields and k not in JOB_KEYS)
    if unknown:
        raise GoldInputError(f"train: unknown option(s) {unknown}; options are the TrainJob keys {list(JOB_KEYS)} and "
                              "GOLDConfig fields (see `gold train --help`).")
    job = TrainJob(**{k: v for k, v in options.items() if k in JOB_KEYS})
    fields = {k: v for k, v in options.items() if k in config_fields}
    if job.teacher is not None:
        fields.setdefault("teacher_model_name_or_path", job.teacher)
    fields.setdefault("output_dir", "runs/gold")
    return job, GOLDConfig(**fields)


def _raw_dataset(path: str, split: str) -> list:
    """The rows of a raw conversation file (or hub dataset), validated by data.sources exactly as `gold align`
    validates them: an invalid row stops with its file, line and field."""
    from gold_pipeline.data.sources import iter_examples

    return list(iter_examples(path, split=split))


def _is_gold_run(out: Path) -> bool:
    return (out / CONFIG_FILE).is_file() or any(out.glob("checkpoint-*"))


def prepare_train_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that holds an earlier run unless resuming, or replace it with overwrite (only a
    folder gold wrote: one that holds gold_train_config.json or checkpoints)."""
    if not out.exists() or resume:
        return
    if not out.is_dir():
        raise GoldInputError(f"output_dir {out} is a file, not a folder: choose another --output-dir.")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise OutputExistsError(
            f"output_dir {out} already holds an earlier run (or other files): pass --resume-from-checkpoint latest "
            f"to continue it, --overwrite to replace it, or another --output-dir."
        )
    if not _is_gold_run(out):
        raise OutputExistsError(f"output_dir {out} is not empty and holds no gold run ({CONFIG_FILE} or "
                                f"checkpoint-*), so --overwrite will not delete it: choose another --output-dir.")
    import shutil

    for entry in out.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def run_train_job(job: TrainJob, args) -> dict[str, Any]:
    """Train, save the final student to args.output_dir, write the resolved config next to it."""
    from accelerate import PartialState

    from gold_pipeline.training.trainer import GOLDTrainer

    out = Path(args.output_dir)
    if PartialState().is_main_process:
        prepare_train_output(out, resume=job.resume_from_checkpoint is not None, overwrite=job.overwrite)
    PartialState().wait_for_everyone()
    train_data = job.aligned if job.aligned is not None else _raw_dataset(job.dataset, job.dataset_split)
    eval_data = job.eval_aligned or (_raw_dataset(job.eval_dataset, job.eval_split) if job.eval_dataset else None)
    trainer = GOLDTrainer(model=job.student, teacher_model=job.teacher, args=args, train_dataset=train_data,
                          eval_dataset=eval_data)
    if trainer.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(
            {"job": dataclasses.asdict(job), "args": json.loads(args.to_json_string())}, indent=2, default=str))
    resume = job.resume_from_checkpoint
    result = trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    trainer.save_model(str(out))
    trainer.processing_class.save_pretrained(str(out))
    return {"global_step": result.global_step, "training_loss": result.training_loss, "output_dir": str(out)}
