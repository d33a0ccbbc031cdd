"""A training run as data: `TrainJob` (models, data, resume) + `GOLDConfig`, built from a YAML/JSON config
file and command-line overrides, and `run_train_job` (what `gold train` calls)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gold_pipeline.errors import GoldInputError, OutputExistsError

JOB_KEYS = ("student", "teacher", "aligned", "dataset", "dataset_config", "dataset_split", "eval_aligned",
            "eval_dataset", "eval_split", "resume_from_checkpoint", "overwrite")
CONFIG_FILE = "gold_train_config.json"  # written into output_dir by every run: marks the folder as a gold run


@dataclass
class TrainJob:
    """What to train on and from where; every other setting is a GOLDConfig field.

    student: student model (local path, hub id or pkg: name). teacher: teacher model (optional when the
    aligned shards carry cached top-K and lmbda=0). aligned / eval_aligned: aligned-shard directories.
    dataset / eval_dataset: raw conversation files (jsonl/json/parquet with `messages` or `prompt`/`completion`),
    aligned on the fly; dataset_config: the `datasets` configuration name of both (hub datasets).
    resume_from_checkpoint: a checkpoint directory, or "latest" for output_dir's last one.
    """

    student: str
    teacher: str | None = None
    aligned: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
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
    if "use_uld_loss" not in fields and cross_tokenizer_pair(job.student, fields):
        # TRL's command line often leaves use_uld_loss out; token-by-token JSD is meaningless across tokenizers
        print("gold train: the student and teacher tokenizers differ, so use_uld_loss=True (ULD over aligned "
              "groups); pass --use_uld_loss false to refuse instead.", file=sys.stderr)
        fields["use_uld_loss"] = True
    return job, GOLDConfig(**fields)


def cross_tokenizer_pair(student: str, fields: dict[str, Any]) -> bool:
    """Whether the student's tokenizer and the teacher's (teacher_tokenizer_name_or_path, else the teacher
    model's) differ. Names that are equal are the same tokenizer without loading; False without a teacher."""
    from gold_pipeline.models.loading import model_tokenizer_name
    from gold_pipeline.text.tokenizers import load_tokenizer, tokenizer_fingerprint

    teacher = fields.get("teacher_tokenizer_name_or_path") or fields.get("teacher_model_name_or_path")
    if not teacher:
        return False
    names = model_tokenizer_name(student), model_tokenizer_name(teacher)
    if names[0] == names[1]:
        return False
    student_tok = load_tokenizer(names[0], revision=fields.get("model_revision"))
    return tokenizer_fingerprint(student_tok) != tokenizer_fingerprint(load_tokenizer(names[1]))


def _raw_dataset(path: str, split: str, config_name: str | None = None) -> list:
    """The rows of a raw conversation file (or hub dataset), validated by data.sources exactly as `gold align`
    validates them: an invalid row stops with its file, line and field."""
    from gold_pipeline.data.sources import iter_examples

    return list(iter_examples(path, split=split, config_name=config_name))


def data_sources(job: TrainJob) -> list[dict[str, Any]]:
    """The fingerprints of the job's training and eval data, for the model card (training/model_card.py)."""
    from gold_pipeline.training.model_card import data_source

    sources = [data_source(job.aligned, role="train", aligned=True) if job.aligned is not None else
               data_source(job.dataset, role="train", split=job.dataset_split, config_name=job.dataset_config)]
    if job.eval_aligned is not None:
        sources.append(data_source(job.eval_aligned, role="eval", aligned=True))
    elif job.eval_dataset is not None:
        sources.append(data_source(job.eval_dataset, role="eval", split=job.eval_split,
                                   config_name=job.dataset_config))
    return sources


_TRUE = ("1", "on", "yes", "true")
HUB_TIMEOUT_S = 10.0


def hub_problem(token: str | None, *, offline: bool, whoami: Callable[[str], Any], timeout_s: float) -> str | None:
    """Why the Hub cannot take a push (None when it can): offline mode, no token, or `whoami(token)` failing or not
    answering within timeout_s (it runs on a daemon thread, so a hung connection cannot hold the run)."""
    if offline:
        return "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); unset it"
    if not token:
        return "no Hugging Face token is set; run `hf auth login`, set HF_TOKEN or pass --hub_token"
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["user"] = whoami(token)
        except Exception as error:  # noqa: BLE001 - any failure means no push; its text goes into the message
            outcome["error"] = error

    thread = threading.Thread(target=call, name="gold-hub-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return f"the Hub did not answer within {timeout_s:g} s; check the network"
    if "error" in outcome:
        error = outcome["error"]
        detail = (str(error).splitlines() or [""])[0]
        return (f"the Hub refused the token or could not be reached ({type(error).__name__}: {detail}); check the "
                "token and the network")
    return None


def check_push_to_hub(args, *, timeout_s: float = HUB_TIMEOUT_S) -> None:
    """With args.push_to_hub, refuse before anything is loaded or written when the Hub cannot take the push. Only
    the configured Hub endpoint (HF_ENDPOINT) is contacted, and only when a token is set and offline mode is off."""
    if not args.push_to_hub:
        return
    from huggingface_hub import constants, get_token, whoami

    offline = constants.HF_HUB_OFFLINE or any(
        os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    token = args.hub_token or get_token()
    problem = hub_problem(token, offline=offline, whoami=lambda t: whoami(token=t), timeout_s=timeout_s)
    if problem is not None:
        raise GoldInputError(
            f"--push_to_hub needs the Hugging Face Hub ({constants.ENDPOINT}), but {problem}. Or train without "
            f"--push_to_hub and upload later: `hf upload REPO_ID {args.output_dir}`."
        )


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
    """Train, save the final student to args.output_dir with its model card (README.md), write the resolved
    config next to it. With args.push_to_hub the Hub is checked first (check_push_to_hub), before anything runs."""
    from accelerate import PartialState

    from gold_pipeline.training.trainer import GOLDTrainer

    check_push_to_hub(args)
    out = Path(args.output_dir)
    if PartialState().is_main_process:
        prepare_train_output(out, resume=job.resume_from_checkpoint is not None, overwrite=job.overwrite)
    PartialState().wait_for_everyone()
    train_data = (job.aligned if job.aligned is not None
                  else _raw_dataset(job.dataset, job.dataset_split, job.dataset_config))
    eval_data = job.eval_aligned or (_raw_dataset(job.eval_dataset, job.eval_split, job.dataset_config)
                                     if job.eval_dataset else None)
    trainer = GOLDTrainer(model=job.student, teacher_model=job.teacher, args=args, train_dataset=train_data,
                          eval_dataset=eval_data)
    trainer.model_card_context.update(student=job.student, teacher=job.teacher or args.teacher_model_name_or_path,
                                      data=data_sources(job))
    if trainer.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(
            {"job": dataclasses.asdict(job), "args": json.loads(args.to_json_string())}, indent=2, default=str))
    resume = job.resume_from_checkpoint
    result = trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    trainer.save_model(str(out))  # with push_to_hub, also writes the card (GOLDTrainer.create_model_card) and uploads
    trainer.processing_class.save_pretrained(str(out))
    if not args.push_to_hub:
        trainer.create_model_card()  # README.md next to the saved student
    return {"global_step": result.global_step, "training_loss": result.training_loss, "output_dir": str(out)}
