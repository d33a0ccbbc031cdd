"""`GOLDTrainer`: transformers.Trainer with the GOLD-specific parts only.

What is overridden and why:
- `get_batch_samples`: builds the optimizer window (on/off-policy draw per slice, rollouts, collation, the
  window's loss denominators summed across processes) and hands the denominators to `compute_loss` through
  Trainer's `num_items_in_batch` argument.
- `compute_loss`: the GOLD loss of one micro-batch (training/loss.py).
- `_get_train_sampler`: seeded, resumable order with num_generations repeats.
- `prediction_step` / `evaluation_loop`: student bits-per-byte on the eval completions.
- `log`: GOLD metrics next to Trainer's.
- `create_model_card`: gold's model card (training/model_card.py) instead of Trainer's draft.
Everything else (optimizer, scheduler, checkpoints and resume, logging integrations, DeepSpeed/FSDP/DDP,
push_to_hub) is Trainer's.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from gold_pipeline.errors import GoldInputError
from gold_pipeline.models.sharding import is_sharded, place_teacher
from gold_pipeline.text.pair import TokenizerPair
from gold_pipeline.training import loss as gold_loss
from gold_pipeline.training.collate import TOPK_COLUMNS, collate_rows, identity_collate, stop_group_rows
from gold_pipeline.training.config import GOLDConfig
from gold_pipeline.training.datasets import AlignedShardDataset, GenerationGroupSampler, build_dataset
from gold_pipeline.training.metrics import JsonlMetricsCallback, MetricsAccumulator, log_completions
from gold_pipeline.training.rollouts import (
    HFGenerateBackend,
    make_generation_backend,
    on_policy_flags,
    rollout_seeds,
    rollout_slices,
    sampling_from_args,
)

logger = logging.getLogger(__name__)

# Loss parts that are sums over a micro-batch divided by window counts: they add up to the window's value.
WINDOW_SUMMED_PARTS = {
    "distillation_loss": "distillation_loss",
    "crossentropy_loss": "crossentropy_loss",
    "seq_kd_loss": "seq_kd_loss",
    "distill/matched": "matched_loss",
    "distill/unmatched": "unmatched_loss",
    "distill/fast_error_bound": "uld_fast_error_bound",
    "distill/projected": "projected_loss",  # projection loss: teacher mass per group on each kind of column
    "distill/teacher_mass_matched": "teacher_mass_matched",
    "distill/teacher_mass_projected": "teacher_mass_projected",
    "distill/teacher_mass_unmatched": "teacher_mass_unmatched",
}


class GOLDTrainer(Trainer):
    """Cross-tokenizer on-/off-policy distillation on top of transformers.Trainer.

    Args mirror TRL's GOLDTrainer: `model` (model or name/path/pkg: name), `teacher_model` (same, or None to
    use `args.teacher_model_name_or_path`; not needed when the data carries cached top-K and lmbda = 0),
    `args` (GOLDConfig), `train_dataset` / `eval_dataset` (aligned-shard directory, datasets.Dataset or list of
    conversations), `processing_class` (student tokenizer), `teacher_processing_class` (teacher tokenizer;
    default: `args.teacher_tokenizer_name_or_path`, else the teacher model's own, else the student's),
    `peft_config` (a peft config; default from `args.use_peft` and `lora_*`).
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the window's counts itself
    _tag_names = ["trl", "gold"]

    def __init__(
        self,
        model: nn.Module | str | None = None,
        teacher_model: nn.Module | str | None = None,
        args: GOLDConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        **kwargs,
    ):
        from gold_pipeline.text.tokenizers import load_tokenizer

        if args is None:
            args = GOLDConfig(output_dir="gold-output")
        if not isinstance(args, GOLDConfig):
            raise GoldInputError(f"args must be a GOLDConfig, got {type(args).__name__}.")
        if model is None:
            raise GoldInputError("GOLDTrainer needs `model` (the student): a model, a local path or a pkg: name.")
        if args.teacher_cache_dir is not None:
            raise GoldInputError(
                f"GOLDConfig.teacher_cache_dir={args.teacher_cache_dir!r}: joining a separate teacher cache at train "
                "time is not supported yet; run `gold align --teacher-cache DIR` so the aligned shards carry the "
                "teacher's top-K columns, and train on that aligned directory."
            )
        chat_template = Path(args.chat_template_path).read_text() if args.chat_template_path else None
        model_name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        if processing_class is None:
            if not isinstance(model, str):
                raise GoldInputError("processing_class (the student tokenizer) is required when `model` is an object.")
            processing_class = load_tokenizer(model, revision=args.model_revision, chat_template=chat_template)
        if isinstance(model, str):
            model = _load(model, args.model_revision, args.model_init_kwargs)
        teacher_name = teacher_model if isinstance(teacher_model, str) else args.teacher_model_name_or_path
        if teacher_processing_class is None:
            tok_name = args.teacher_tokenizer_name_or_path or teacher_name
            teacher_processing_class = (
                load_tokenizer(tok_name, revision=args.teacher_model_revision if tok_name == teacher_name else None)
                if tok_name else processing_class
            )
        if args.use_uld_loss is False and teacher_processing_class is not processing_class:
            from gold_pipeline.text.tokenizers import tokenizer_fingerprint

            if tokenizer_fingerprint(teacher_processing_class) != tokenizer_fingerprint(processing_class):
                raise GoldInputError(
                    "GOLDConfig.use_uld_loss=False (generalized JSD) compares the two models token by token, but the "
                    "student and teacher tokenizers differ; set use_uld_loss=True for a cross-tokenizer pair."
                )
        self.pair = TokenizerPair.build(processing_class, teacher_processing_class)
        check_vocab(model, len(processing_class), "student", model_name)

        train_dataset = build_dataset(train_dataset, self.pair, max_completion_length=args.max_completion_length,
                                      max_length=args.max_length, what="train_dataset")
        eval_dataset = build_dataset(eval_dataset, self.pair, max_completion_length=args.max_completion_length,
                                     max_length=args.max_length, what="eval_dataset")
        rows_per_batch = args.per_device_train_batch_size * max(args.world_size, 1)
        if train_dataset is not None and args.dataloader_drop_last and len(train_dataset) < rows_per_batch:
            raise GoldInputError(
                f"train_dataset has {len(train_dataset)} rows, fewer than one batch (per_device_train_batch_size="
                f"{args.per_device_train_batch_size} x {max(args.world_size, 1)} process(es)), and "
                "dataloader_drop_last=True drops it: training would run 0 steps. Add rows, lower "
                "per_device_train_batch_size, or set dataloader_drop_last=False."
            )
        cached_topk = isinstance(train_dataset, AlignedShardDataset) and set(TOPK_COLUMNS) <= set(train_dataset.columns)
        self.use_cached_topk = bool(args.use_teacher_cache and cached_topk)
        needs_teacher = args.lmbda > 0 or args.seq_kd or not self.use_cached_topk
        self.teacher_service = None
        if args.teacher_server_url is not None:  # the served teacher scores instead (training/teacher_service.py)
            from gold_pipeline.training.teacher_service import start_teacher_service

            self.teacher_service = start_teacher_service(
                args, teacher_processing_class, reference=teacher_model, reference_name=teacher_name,
                load=lambda name: _load(name, args.teacher_model_revision, args.teacher_model_init_kwargs))
            teacher_model, needs_teacher = None, False  # a local teacher was the probe's reference only
        if needs_teacher and teacher_model is None and args.teacher_model_name_or_path is None:
            raise GoldInputError(
                "No teacher: pass teacher_model or GOLDConfig.teacher_model_name_or_path (only aligned shards with "
                "cached teacher top-K and lmbda=0 train without one), or serve it (teacher_server_url)."
            )
        if isinstance(teacher_model, str) or (teacher_model is None and needs_teacher):
            teacher_model = _load(teacher_name, args.teacher_model_revision, args.teacher_model_init_kwargs)
        if teacher_model is not None:
            check_vocab(teacher_model, len(teacher_processing_class), "teacher", teacher_name or "")
        # logit columns that are tokens of both the model and the tokenizer's byte table
        self.student_width = min(_embedding_rows(model), self.pair.student_vocab_size)
        self.teacher_width = (min(_embedding_rows(teacher_model), self.pair.teacher_vocab_size)
                              if teacher_model is not None else self.pair.teacher_vocab_size)
        if args.use_peft or peft_config is not None:
            model = apply_lora(model, args, peft_config)
        if args.disable_dropout:
            disable_dropout(model)
            if teacher_model is not None:
                disable_dropout(teacher_model)

        callbacks = list(callbacks or [])
        if args.metrics_jsonl:
            callbacks.append(JsonlMetricsCallback(Path(args.output_dir) / args.metrics_jsonl))
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or identity_collate,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        self.teacher_model = teacher_model
        if teacher_model is not None:  # replicated on every rank, never sharded (models/sharding.py)
            teacher_model = place_teacher(teacher_model, self.accelerator.device)
        self.loss_settings = gold_loss.LossSettings.from_args(args, self.student_width, self.teacher_width)
        self.vocab_map = self._vocab_map() if args.use_uld_loss and args.uld_use_hybrid_loss else None
        self.student_backend = make_generation_backend(args, stop_ids=list(self.pair.student.stop_ids),
                                                       pad_id=self.pair.student_pad_id)
        self.teacher_backend = HFGenerateBackend(sampling_from_args(args), stop_ids=list(self.pair.teacher.stop_ids),
                                                 pad_id=self.pair.teacher_pad_id)
        self.gold_metrics = MetricsAccumulator()
        # What the model card cannot learn from the trainer: the model names as given and the data fingerprints
        # (run_train_job fills "student", "teacher", "data"; see training/model_card.py).
        self.model_card_context: dict = {}
        self._completion_samples: list[tuple[str, str, str]] = []
        self._warned_short_batch = False
        self._window_policy_slices = {"on": 0, "off": 0, "seq_kd": 0}
        self._eval_sums = torch.zeros(2, dtype=torch.float64)

    # ------------------------------------------------------------------------------------------------------
    # Data.
    # ------------------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return GenerationGroupSampler(dataset, num_generations=self.args.num_generations, seed=seed)

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator  # GOLD rows are not model kwargs; nothing to remove

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The optimizer window: GA slices of rows -> on/off-policy draw -> rollouts -> collated micro-batches,
        plus the window's loss denominators (summed over processes) as `num_items_in_batch`."""
        slices, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not slices:
            return slices, None
        args = self.args
        short = [len(s) for s in slices if len(s) < args.per_device_train_batch_size]
        if (short or len(slices) < args.gradient_accumulation_steps) and not self._warned_short_batch:
            logger.warning(
                "Short final window: %d slice(s) of sizes %s (per_device_train_batch_size=%d, "
                "gradient_accumulation_steps=%d) because dataloader_drop_last=%s; the loss is normalized over the "
                "rows it has. Set dataloader_drop_last=True to drop it.",
                len(slices), [len(s) for s in slices], args.per_device_train_batch_size,
                args.gradient_accumulation_steps, args.dataloader_drop_last,
            )
            self._warned_short_batch = True
            self.gold_metrics.add_count("short_batches", 1)
        started = time.perf_counter()
        flags = on_policy_flags(args.lmbda, seed=args.seed, global_step=self.state.global_step,
                                num_slices=len(slices))
        on = [i for i, f in enumerate(flags) if f]
        off = [i for i, f in enumerate(flags) if not f]
        generated = 0

        def seeds(sampler: str) -> list[int]:
            return rollout_seeds(args.seed, sampler=sampler, global_step=self.state.global_step,
                                 process=self.accelerator.process_index, count=sum(map(len, slices)))

        if on:
            slices, n = rollout_slices(slices, on, model=self.accelerator.unwrap_model(self.model),
                                       backend=self.student_backend, pair=self.pair, sampler="student",
                                       max_completion_length=args.max_completion_length, seeds=seeds("student"))
            generated += n
        if args.seq_kd and off:
            slices, n = rollout_slices(slices, off, model=self.teacher_model, backend=self.teacher_backend,
                                       pair=self.pair, sampler="teacher",
                                       max_completion_length=args.max_completion_length, seeds=seeds("teacher"))
            generated += n
        generation_seconds = time.perf_counter() - started
        batches = []
        counts = dict.fromkeys(gold_loss.WINDOW_KEYS, 0)
        self._window_policy_slices = {"on": len(on), "off": 0 if args.seq_kd else len(off),
                                      "seq_kd": len(off) if args.seq_kd else 0}
        self.gold_metrics.add_window()
        for i, rows in enumerate(slices):
            if not args.uld_skip_student_eos and args.use_uld_loss:
                rows = stop_group_rows(rows, self.pair)
            batch = collate_rows(rows, self.pair)
            batch["policy"] = "on" if flags[i] else ("seq_kd" if args.seq_kd else "off")
            if batch["policy"] != "off" or not self.use_cached_topk:
                for key in TOPK_COLUMNS:
                    batch.pop(key, None)
            self._note_slice(batch)
            for key, value in gold_loss.window_counts(batch, seq_kd=batch["policy"] == "seq_kd",
                                                      use_uld_loss=args.use_uld_loss).items():
                counts[key] += value
            batch["completion_texts"] = [r["completion_text"] for r in batch.pop("rows")]
            batches.append(batch)
        window = torch.tensor([counts[k] for k in gold_loss.WINDOW_KEYS], dtype=torch.float64, device=device)
        if self.accelerator.num_processes > 1:
            window = self.accelerator.reduce(window, reduction="sum")
        window = {k: window[i].to(torch.float32) for i, k in enumerate(gold_loss.WINDOW_KEYS)}
        self.gold_metrics.add_count("counter/generation_seconds", generation_seconds)
        self.gold_metrics.add_count("counter/generated_tokens", generated)
        return batches, window

    def _note_slice(self, batch: dict) -> None:
        rows = batch["rows"]
        self.gold_metrics.add_count("counter/student_tokens", int(batch["student_token_ids"].numel()))
        excluded = int((batch["student_group_ids"] < 0).sum()) - sum(
            len(self.pair.student_eot_ids) for r in rows
            if r["student_completion_ids"][-len(self.pair.student_eot_ids):] == self.pair.student_eot_ids
        )
        self.gold_metrics.add_count("counter/excluded_student_tokens", max(excluded, 0))
        self.gold_metrics.add_mean("on_policy_share", float(batch["policy"] == "on"))
        if self.args.log_completions and batch["policy"] == "on":
            for row in rows:
                prompt = self.processing_class.decode(row["student_prompt_ids"], skip_special_tokens=False)
                self._completion_samples.append((batch["policy"], prompt, row["completion_text"]))

    # ------------------------------------------------------------------------------------------------------
    # Loss.
    # ------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        window = num_items_in_batch if isinstance(num_items_in_batch, dict) else None
        if self.args.use_uld_loss and self.accelerator.unwrap_model(model) is model and not is_sharded(model):
            # not wrapped: hidden states + LM head, logits made per chunk of groups in the loss
            student_logits = gold_loss.forward_completion_rows(model, inputs, vocab_size=self.student_width)
        else:
            student_logits = gold_loss.forward_completion_logits(model, inputs, vocab_size=self.student_width)
        if inputs.get("policy") == "seq_kd":
            loss, parts = gold_loss.seq_kd_loss(gold_loss.as_logits(student_logits), inputs, window)
        else:
            loss, parts = gold_loss.distillation_loss(
                student_logits, self._teacher_outputs(inputs), inputs, self.loss_settings, window, self.vocab_map
            )
        self._record(inputs, loss, parts)
        if window is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the denominators are global
        return (loss, {"logits": gold_loss.as_logits(student_logits)}) if return_outputs else loss

    def _teacher_outputs(self, inputs: dict) -> dict[str, torch.Tensor]:
        if "teacher_topk_ids" in inputs:
            return {"topk_ids": inputs["teacher_topk_ids"], "topk_logprobs": inputs["teacher_topk_logprobs"],
                    "token_logprobs": inputs["teacher_token_logprobs"]}
        if self.teacher_service is not None:
            from gold_pipeline.training.teacher_service import score_batch

            started = time.perf_counter()
            outputs, bounded = score_batch(self.teacher_service, inputs)
            self.gold_metrics.add_count("counter/teacher_service_seconds", time.perf_counter() - started)
            self.gold_metrics.add_count("counter/teacher_service_token_logprob_bounded", bounded)
            return outputs
        if self.teacher_model is None:
            raise RuntimeError("This batch needs teacher log-probs but no teacher model was loaded.")
        with torch.no_grad():
            rows = gold_loss.forward_completion_rows(self.teacher_model, inputs, prefix="teacher_",
                                                     vocab_size=self.teacher_width)
        return {"rows": rows}

    def _record(self, inputs: dict, loss: torch.Tensor, parts: dict) -> None:
        """Window-normalized parts add up over the window's micro-batches (and processes) to the window value."""
        for key, value in parts.items():
            name = WINDOW_SUMMED_PARTS.get(key)
            if name is not None:
                self.gold_metrics.add_window_sum(name, float(value))
        share = self.args.gradient_accumulation_steps / max(self._window_policy_slices[inputs.get("policy", "off")], 1)
        self.gold_metrics.add_window_sum(f"{inputs.get('policy', 'off')}_policy_loss", float(loss.detach()) * share)

    def _vocab_map(self):
        from gold_pipeline.losses import vocab_split
        from gold_pipeline.text.vocab_map import cached_vocab_map, with_extra_pairs

        mapping = cached_vocab_map(self.pair.student_table, self.pair.teacher_table)  # (M, 2)
        if not self.args.uld_skip_student_eos:  # stop groups: their end-of-turn columns are compared as matched
            mapping = with_extra_pairs(mapping, self.pair.end_of_turn_pair(self.args.uld_token_merge_strategy))
        keep = (mapping[:, 0] < self.student_width) & (mapping[:, 1] < self.teacher_width)
        split = vocab_split(mapping[keep], self.student_width, self.teacher_width)
        if not self.args.uld_use_projection_loss:
            return split
        from gold_pipeline.losses.projection import ProjectionPair, projection_columns
        from gold_pipeline.text.projection import cached_projection

        table = cached_projection(self.pair.student_table, self.pair.teacher_table, self.pair.teacher_tokenizer,
                                  max_pieces=self.args.uld_projection_max_pieces)
        return ProjectionPair(split, projection_columns(table, self.student_width, self.teacher_width))

    # ------------------------------------------------------------------------------------------------------
    # Evaluation: student bits per byte on the eval completions (teacher completions).
    # ------------------------------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        from gold_pipeline.text.bytes import completion_byte_lengths

        batch = collate_rows(inputs, self.pair) if isinstance(inputs, list) else inputs
        # bytes the student's completion tokens spell (end-of-turn ids have none)
        nbytes = float(completion_byte_lengths(self.pair.student_table, batch["student_token_ids"].numpy()).sum())
        batch = self._prepare_inputs(batch)
        with torch.no_grad():
            logits = gold_loss.forward_completion_logits(model, batch, vocab_size=self.student_width)
            nats, tokens = gold_loss.student_nats(logits, batch, self.pair.student_eot_ids)
        self._eval_sums += torch.tensor([float(nats), nbytes], dtype=torch.float64)
        return (nats / max(tokens, 1)).detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Trainer's loop, plus `{prefix}_bits_per_byte` = summed nats / (ln 2 * summed bytes), all processes."""
        self._eval_sums.zero_()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        sums = self._eval_sums.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        nats, nbytes = sums.tolist()
        output.metrics[f"{metric_key_prefix}_bits_per_byte"] = nats / (math.log(2) * max(nbytes, 1.0))
        return output

    # ------------------------------------------------------------------------------------------------------
    # Logging and the model card.
    # ------------------------------------------------------------------------------------------------------

    def create_model_card(self, model_name: str | None = None, **kwargs) -> None:
        """Trainer's card hook (push_to_hub calls it before uploading the folder): gold's card, README.md in
        output_dir (training/model_card.py). Trainer's keyword arguments (tags, dataset_name, ...) are not used."""
        if not self.is_world_process_zero():
            return
        from gold_pipeline.training.model_card import trainer_card_info, write_model_card

        write_model_card(self.args.output_dir, trainer_card_info(self, model_name=model_name))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the GOLD metrics gathered since the last one
            logs.update(self.gold_metrics.summary(self.accelerator))
            if self.args.log_completions and self.state.global_step % self.args.log_completions_steps == 0:
                if self.accelerator.is_main_process:
                    log_completions(Path(self.args.output_dir) / "completions.jsonl", self.state.global_step,
                                    self._completion_samples, self.args.num_completions_to_print)
                self._completion_samples = []
        super().log(logs, start_time)


# ----------------------------------------------------------------------------------------------------------
# Model helpers.
# ----------------------------------------------------------------------------------------------------------


def _load(name: str, revision: str | None, init_kwargs: dict | None):
    from gold_pipeline.models.loading import load_model

    return load_model(name, revision=revision, init_kwargs=init_kwargs)


def _embedding_rows(model) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def check_vocab(model, tokenizer_size: int, side: str, name: str) -> None:
    """Refuse a model whose embedding has fewer rows than its tokenizer has tokens (ids would overflow).
    Extra rows (padding to a multiple) are allowed: their logits are dropped in the loss."""
    rows = _embedding_rows(model)
    if rows < tokenizer_size:
        raise GoldInputError(
            f"The {side} model {name} has {rows} embedding rows but its tokenizer has {tokenizer_size} tokens: "
            f"pass the {side} tokenizer the model was trained with, or call "
            f"model.resize_token_embeddings({tokenizer_size}) first."
        )


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def apply_lora(model, args: GOLDConfig, peft_config=None):
    from peft import LoraConfig, get_peft_model

    if peft_config is None:
        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.lora_target_modules,
            task_type="CAUSAL_LM",
        )
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)
