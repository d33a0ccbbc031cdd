"""The model card (README.md) saved with a trained student: both models and tokenizers, the GOLD method and its
settings, the data fingerprints, the final metrics.

    build_model_card(info) -> str        pure: the card's Markdown (with Hub metadata) from a plain dict
    final_metrics(log_history) -> dict   pure: the last training/eval numbers of Trainer's log history
    data_source(path, role=...) -> dict  the fingerprints of one data source (aligned manifest, or raw rows)
    trainer_card_info(trainer) -> dict   what a trained GOLDTrainer knows, plus its `model_card_context`
    write_model_card(directory, info)    README.md into the folder

`info` layout (every key optional except student/teacher/settings):

    model_name: str                                    the card's title
    student / teacher: {"model": str | None, "tokenizer": {"name": str, "sha256": str, "vocab_size": int}}
    settings: {GOLDConfig field: value}                the resolved arguments (GOLDConfig.to_dict())
    world_size: int                                    training processes
    data: [{"role": "train" | "eval", "source": str, "kind": str, "fingerprint": {...}}]
    metrics: {name: number}                            final_metrics(...)
    versions: {"gold": str, "transformers": str, "torch": str}
    base_model: str | None, datasets: [str]            Hub metadata (hub ids only)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"

METHOD_FIELDS = (
    "use_uld_loss", "uld_use_hybrid_loss", "uld_loss_mode", "lmbda", "beta", "seq_kd", "temperature", "top_p",
    "top_k", "max_completion_length", "max_length", "num_generations", "uld_crossentropy_weight",
    "uld_distillation_weight", "uld_hybrid_matched_weight", "uld_hybrid_unmatched_weight",
    "uld_student_temperature", "uld_teacher_temperature", "uld_token_merge_strategy", "uld_skip_student_eos",
    "uld_skip_teacher_eos", "use_teacher_cache", "uld_use_projection_loss", "uld_projection_weight",
    "uld_projection_exclusive", "uld_projection_max_pieces",
)
TRAINING_FIELDS = (
    "max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "seed", "bf16", "fp16",
    "gradient_checkpointing", "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
)
# Summary keys of Trainer's end-of-training log entry.
_SUMMARY_KEYS = ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def loss_description(settings: Mapping[str, Any]) -> str:
    """One sentence naming the loss the settings select."""
    if settings.get("use_uld_loss") and settings.get("uld_use_hybrid_loss"):
        matched, unmatched = settings.get("uld_hybrid_matched_weight"), settings.get("uld_hybrid_unmatched_weight")
        weights = "adaptive weights" if matched is None else f"weights {matched} (matched) / {unmatched} (unmatched)"
        loss = (f"GOLD hybrid loss: generalized JSD (beta={settings.get('beta')}) on the byte-identical vocabulary "
                f"and ULD (sorted-probability distance) on the rest, {weights}, over byte-aligned token groups")
    elif settings.get("use_uld_loss"):
        loss = "ULD loss (sorted-probability distance) over byte-aligned token groups"
    else:
        loss = f"generalized JSD (beta={settings.get('beta')}), token by token (one tokenizer)"
    if settings.get("uld_crossentropy_weight"):
        loss += f", plus {settings['uld_crossentropy_weight']} x cross-entropy on the completion"
    return loss + "."


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "[]"
    return "None" if value is None else str(value)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {name} | {_value(value).replace('|', '/')} |" for name, value in rows]
    return lines


def _fingerprint_lines(value: Any, indent: int) -> list[str]:
    """Nested fingerprint dicts as a bullet list; a file entry ({path, sha256, bytes}) on one line."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, Mapping) and "path" in value and "sha256" in value and "bytes" in value:
        return [f"{pad}- `{value['path']}`: sha256 `{value['sha256']}`, {value['bytes']} bytes"]
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, (Mapping, list)) and item:
                lines.append(f"{pad}- {key}:")
                lines += _fingerprint_lines(item, indent + 1)
            else:
                lines.append(f"{pad}- {key}: `{_value(item)}`")
        return lines
    if isinstance(value, list):
        for item in value:
            lines += _fingerprint_lines(item, indent) if isinstance(item, (Mapping, list)) else \
                [f"{pad}- `{_value(item)}`"]
        return lines
    return [f"{pad}- `{_value(value)}`"]


def _front_matter(info: Mapping[str, Any]) -> list[str]:
    settings = info["settings"]
    tags = ["gold", "knowledge-distillation", "cross-tokenizer", "trl", "gold-distillation"]
    lines = ["---", f"library_name: {'peft' if settings.get('use_peft') else 'transformers'}"]
    if info.get("base_model"):
        lines.append(f"base_model: {json.dumps(info['base_model'])}")
    if info.get("datasets"):
        lines.append("datasets:")
        lines += [f"- {json.dumps(d)}" for d in info["datasets"]]
    lines.append("tags:")
    lines += [f"- {tag}" for tag in tags]
    lines.append("---")
    return lines


def build_model_card(info: Mapping[str, Any]) -> str:
    """The model card's Markdown (Hub metadata block first) from `info` (layout in the module docstring)."""
    settings = info["settings"]
    student, teacher = info["student"], info["teacher"]
    world = int(info.get("world_size") or 1)
    batch = settings.get("per_device_train_batch_size"), settings.get("gradient_accumulation_steps")
    lines = _front_matter(info)
    lines += ["", f"# {info.get('model_name') or 'gold student'}", "",
              (f"The student `{student.get('model')}` distilled from the teacher `{teacher.get('model')}` by gold "
               "(`gold train`), with GOLD (General Online Logit Distillation, the method of TRL's experimental "
               "GOLDTrainer): the teacher's token distributions are compared with the student's over the same "
               "bytes, so the two models may use different tokenizers."), ""]

    lines += ["## Models and tokenizers", "", "| side | model | tokenizer | vocabulary | tokenizer sha256 |",
              "|---|---|---|---|---|"]
    for side, entry in (("student", student), ("teacher", teacher)):
        tok = entry.get("tokenizer") or {}
        lines.append(f"| {side} | `{entry.get('model')}` | `{tok.get('name')}` | {tok.get('vocab_size')} | "
                     f"`{tok.get('sha256')}` |")

    lines += ["", "## Method", "", f"Loss: {loss_description(settings)}", "",
              f"On-policy share lmbda={settings.get('lmbda')}: each slice of an optimizer window is, with that "
              "probability, the student's own samples scored by the teacher; otherwise "
              + ("completions the teacher generates (sequence-level KD)." if settings.get("seq_kd")
                 else "the dataset's (teacher's) completions."), ""]
    lines += _table([(name, settings.get(name)) for name in METHOD_FIELDS if name in settings], ("setting", "value"))

    lines += ["", "## Training", ""]
    rows = [(name, settings.get(name)) for name in TRAINING_FIELDS
            if name in settings and (settings.get("use_peft") or not name.startswith("lora_"))]
    if all(isinstance(b, int) for b in batch):
        rows.append(("processes", world))
        rows.append(("rows per optimizer step", batch[0] * batch[1] * world))
    lines += _table(rows, ("setting", "value"))

    lines += ["", "## Data", ""]
    for source in info.get("data") or []:
        lines.append(f"- {source.get('role', 'train')}: {source.get('kind')} `{source.get('source')}`")
        lines += _fingerprint_lines(source.get("fingerprint") or {}, 1)
    if not info.get("data"):
        lines.append("- (not recorded)")

    lines += ["", "## Results", ""]
    metrics = info.get("metrics") or {}
    lines += _table(sorted(metrics.items()), ("metric", "value")) if metrics else ["(no metrics logged)"]

    versions = info.get("versions") or {}
    lines += ["", "## Reproduce", "",
              ("`gold_train_config.json` in this folder holds the resolved job and arguments; `metrics.jsonl` "
               "every log line."), ""]
    if versions:
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
        lines.append("")
    return "\n".join(lines)


def final_metrics(log_history: list[Mapping[str, Any]]) -> dict[str, float]:
    """The last training log line's numbers (step, loss, GOLD parts), the end-of-training summary (train_loss =
    the mean loss, runtime) and the last evaluation's `eval_*` numbers, from Trainer's state.log_history."""
    out: dict[str, float] = {}
    logs = [entry for entry in log_history if "loss" in entry]
    if logs:
        last = logs[-1]
        out.update({k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and k not in ("epoch", "step", "learning_rate", "grad_norm")})
        out["last_logged_step"] = last.get("step")
    summaries = [entry for entry in log_history if "train_loss" in entry]
    if summaries:
        out.update({k: summaries[-1][k] for k in _SUMMARY_KEYS if k in summaries[-1]})
        if "step" in summaries[-1]:
            out["global_step"] = summaries[-1]["step"]
    evals = [entry for entry in log_history if any(k.startswith("eval_") for k in entry)]
    if evals:
        out.update({k: v for k, v in evals[-1].items() if k.startswith("eval_") and isinstance(v, (int, float))})
    return {k: v for k, v in out.items() if v is not None}


def data_source(path: str, *, role: str, aligned: bool = False, split: str = "train",
                config_name: str | None = None) -> dict[str, Any]:
    """Fingerprints of one data source: for a `gold align` folder its manifest (sha256, rows, row statuses, the
    fingerprints of the data and teacher it was made from); for raw rows data.sources.dataset_fingerprint."""
    if aligned:
        from gold_pipeline.data.shards import MANIFEST_NAME, file_sha256, read_manifest

        manifest = read_manifest(path, kind="aligned")
        fingerprints = manifest.get("fingerprints") or {}
        fingerprint = {
            "manifest_sha256": file_sha256(Path(path) / MANIFEST_NAME),
            "num_rows": manifest.get("num_rows"),
            "rows_by_status": (manifest.get("stats") or {}).get("rows_by_status"),
            "source": fingerprints.get("dataset"),
        }
        if fingerprints.get("teacher_model"):
            fingerprint["teacher_model"] = fingerprints["teacher_model"]
        return {"role": role, "source": str(path), "kind": "aligned shards", "fingerprint": fingerprint}
    from gold_pipeline.data.sources import dataset_fingerprint

    fingerprint = dataset_fingerprint(path, split=split, config_name=config_name)
    return {"role": role, "source": str(path), "kind": f"dataset ({fingerprint.get('kind')})",
            "fingerprint": fingerprint}


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not name.startswith("pkg:") and name.count("/") == 1 and not Path(name).exists()


def _tokenizer_entry(tokenizer, name: str | None) -> dict[str, Any]:
    from gold_pipeline.text.tokenizers import tokenizer_fingerprint

    return {"name": name or getattr(tokenizer, "name_or_path", None), "sha256": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer)}


def trainer_card_info(trainer, *, model_name: str | None = None) -> dict[str, Any]:
    """The card's `info` for a trained GOLDTrainer. `trainer.model_card_context` (filled by run_train_job) gives
    the model names as the user gave them and the data fingerprints; without it they come from the models'
    configs and an aligned training folder."""
    import torch
    import transformers

    from gold_pipeline.data.shards import package_version
    from gold_pipeline.training.datasets import AlignedShardDataset

    args = trainer.args
    context = trainer.model_card_context
    student = context.get("student") or getattr(trainer.accelerator.unwrap_model(trainer.model).config,
                                                "_name_or_path", None)
    teacher = context.get("teacher") or args.teacher_model_name_or_path or (
        getattr(trainer.teacher_model.config, "_name_or_path", None) if trainer.teacher_model is not None else None)
    data = context.get("data")
    if data is None and isinstance(trainer.train_dataset, AlignedShardDataset):
        data = [data_source(str(trainer.train_dataset.directory), role="train", aligned=True)]
    hub_datasets = [d["source"] for d in data or [] if (d.get("fingerprint") or {}).get("kind") == "hub"]
    return {
        "model_name": model_name or (args.hub_model_id or Path(args.output_dir).name),
        "student": {"model": student, "tokenizer": _tokenizer_entry(trainer.pair.student_tokenizer, student)},
        "teacher": {"model": teacher, "tokenizer": _tokenizer_entry(
            trainer.pair.teacher_tokenizer, args.teacher_tokenizer_name_or_path or teacher)},
        "settings": args.to_dict(),
        "world_size": args.world_size,
        "data": data or [],
        "metrics": final_metrics(trainer.state.log_history),
        "versions": {"gold": package_version(), "transformers": transformers.__version__, "torch": torch.__version__},
        "base_model": student if _is_hub_id(student) else None,
        "datasets": hub_datasets,
    }


def write_model_card(directory: str | Path, info: Mapping[str, Any]) -> Path:
    """Write build_model_card(info) to DIRECTORY/README.md; returns the path."""
    path = Path(directory) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_model_card(info), encoding="utf-8")
    return path
