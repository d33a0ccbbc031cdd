"""`GOLDConfig`: transformers.TrainingArguments plus the GOLD fields of TRL's GOLDConfig.

Field names, defaults and meaning follow TRL 1.16's `GOLDConfig` (trl/experimental/gold/gold_config.py) so
that the seed's scripts run unchanged. Differences, all deliberate:

- `uld_token_merge_strategy` takes "first" (default: the first-position merge of DESIGN §3, without TRL's
  one-position logit shift, trl#5152) or "last"; TRL's names are accepted and mapped ("observed" -> "first",
  "bayesian" -> "last").
- alignment is always the exact byte alignment (`use_extended_uld` must stay True).
- extra fields: `uld_loss_mode`, `uld_use_projection_loss` (+ `uld_projection_*`), `teacher_cache_dir`,
  `use_teacher_cache`, `max_length`, `model_init_kwargs`, LoRA (`use_peft`, `lora_*`), `chat_template_path`,
  `metrics_jsonl`, the served teacher (`teacher_server_*`, training/teacher_service.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from gold_pipeline.errors import GoldInputError

logger = logging.getLogger(__name__)

MERGE_STRATEGY_ALIASES = {"first": "first", "last": "last", "observed": "first", "bayesian": "last"}
ULD_LOSS_MODES = ("fast", "exact")
VLLM_MODES = ("colocate", "server")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class GOLDConfig(TrainingArguments):
    """Training arguments for `GOLDTrainer` (TRL GOLD field names and defaults; see module docstring)."""

    # Defaults that differ from TrainingArguments (as in TRL).
    learning_rate: float = field(default=1e-7, metadata=_help("The initial learning rate for AdamW."))
    logging_steps: float = field(default=10, metadata=_help("Log every N optimizer steps."))
    remove_unused_columns: bool = field(
        default=False, metadata=_help("Kept False: GOLD batches carry alignment fields the model does not take.")
    )

    # Generation and the training loop.
    temperature: float = field(default=0.9, metadata=_help("Sampling temperature of on-policy generations."))
    top_p: float = field(default=0.95, metadata=_help("Nucleus sampling of on-policy generations (1.0 = off)."))
    top_k: int = field(default=0, metadata=_help("Top-k filtering of on-policy generations (0 = off)."))
    lmbda: float = field(
        default=0.5,
        metadata=_help("Probability that a slice of the optimizer window is on-policy (student samples)."),
    )
    beta: float = field(
        default=0.5,
        metadata=_help("Generalized JSD interpolation: 0 = KL(teacher||student), 1 = KL(student||teacher)."),
    )
    max_completion_length: int = field(default=128, metadata=_help("Maximum tokens generated per completion."))
    max_length: int | None = field(
        default=1024,
        metadata=_help("Maximum prompt+completion tokens; prompts keep their end (the generation marker)."),
    )
    model_revision: str | None = field(default=None, metadata=_help("Revision of the student model."))
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata=_help("Keyword arguments for loading the student model from a name.")
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata=_help("Teacher model name, local path or pkg: name.")
    )
    teacher_model_revision: str | None = field(default=None, metadata=_help("Revision of the teacher model."))
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata=_help("Keyword arguments for loading the teacher model from a name (dict or JSON).")
    )
    teacher_tokenizer_name_or_path: str | None = field(
        default=None,
        metadata=_help("Teacher tokenizer; None = the teacher model's own, else the student's (same tokenizer)."),
    )
    chat_template_path: str | None = field(
        default=None,
        metadata=_help("Chat template file for the student tokenizer (as TRL/SFTConfig); default: its own, else "
                       "the built-in template. The teacher always uses its own (or the built-in) template."),
    )
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout of student and teacher to 0."))
    seq_kd: bool = field(
        default=False,
        metadata=_help("Sequence-level KD: off-policy slices are teacher-generated completions trained with CE."),
    )
    num_generations: int = field(default=1, metadata=_help("Generations per prompt in the optimizer window."))
    generation_batch_size: int | None = field(
        default=None,
        metadata=_help("Unique prompts per process per optimizer step; None = batch*accumulation // num_generations."),
    )

    # ULD loss.
    use_uld_loss: bool = field(
        default=False, metadata=_help("Cross-tokenizer ULD loss instead of the generalized JSD (same tokenizer).")
    )
    use_extended_uld: bool = field(
        default=True, metadata=_help("Byte alignment with merged probabilities (the only mode here).")
    )
    uld_token_merge_strategy: str = field(
        default="first",
        metadata=_help('Merge inside aligned groups: "first" (default) or "last"; TRL names "observed"/"bayesian" map.'),
    )
    uld_loss_mode: str = field(
        default="exact",
        metadata=_help('How ULD sorts distributions: "exact" (default: full sort, on packed int64 keys in NumPy, as fast '
                       'as "fast" in bench/train and bit-for-bit equal across micro-batchings) or "fast" (top ranks '
                       'sorted, loss within 1e-3 relative of exact).'),
    )
    uld_groups_per_chunk: int = field(
        default=64, metadata=_help("Aligned groups merged and compared at a time (bounds the (G, V) temporaries).")
    )
    uld_checkpoint_chunks: bool = field(
        default=True, metadata=_help("Recompute chunks in backward instead of keeping their activations, once the "
                                     "kept activations would exceed uld_keep_activations_mb.")
    )
    uld_keep_activations_mb: float = field(
        default=1024.0, metadata=_help("Activation memory (estimated, MB) the loss chunks may keep for backward before "
                                       "chunks are recomputed instead; 0 = recompute every chunk (least memory).")
    )
    uld_use_hybrid_loss: bool = field(
        default=False, metadata=_help("JSD on the byte-identical vocabulary, ULD on the rest.")
    )
    uld_hybrid_matched_weight: float | None = field(
        default=None, metadata=_help("Weight of the matched part; None (with unmatched None) = adaptive.")
    )
    uld_hybrid_unmatched_weight: float | None = field(
        default=None, metadata=_help("Weight of the unmatched part; None (with matched None) = adaptive.")
    )
    uld_use_projection_loss: bool = field(
        default=False, metadata=_help("Hybrid loss plus a generalized JSD on student tokens that spell 2..4 teacher "
                                      "tokens (multi-digit numbers), against the teacher's chain-rule probability "
                                      "of their bytes (losses/projection.py); needs uld_use_hybrid_loss and the "
                                      '"first" merge.')
    )
    uld_projection_weight: float | None = field(
        default=None, metadata=_help("Weight of the projected part; None = the matched part's weight.")
    )
    uld_projection_exclusive: bool = field(
        default=True, metadata=_help("Student tokens that spell the start of the teacher's path keep only the mass "
                                     "their longer projectable extensions do not take (each string counted once; "
                                     "losses/projection.py); False = the plain chain-rule values.")
    )
    uld_projection_max_pieces: int = field(
        default=4, metadata=_help("Most teacher tokens a projectable student token may spell (2..8; X-Token: 4).")
    )
    uld_crossentropy_weight: float = field(default=0.0, metadata=_help("Weight of CE on the student's completion."))
    uld_distillation_weight: float = field(default=1.0, metadata=_help("Weight of the distillation loss."))
    uld_student_temperature: float = field(default=1.0, metadata=_help("Student temperature in the ULD loss."))
    uld_teacher_temperature: float = field(default=1.0, metadata=_help("Teacher temperature in the ULD loss."))
    uld_skip_student_eos: bool = field(
        default=True, metadata=_help("Leave the student's end-of-turn tokens out of the distillation loss. False "
                                     "(with uld_skip_teacher_eos): both sides' end-of-turn tokens form one group "
                                     "and their columns are paired in the hybrid loss's matched part.")
    )
    uld_skip_teacher_eos: bool = field(
        default=True, metadata=_help("Leave the teacher's end-of-turn tokens out of the distillation loss.")
    )

    # Teacher cache (top-K log-probs written by `gold teacher-cache`, carried by the aligned shards).
    use_teacher_cache: bool = field(
        default=True, metadata=_help("Use cached teacher top-K log-probs for off-policy slices when present.")
    )
    teacher_cache_dir: str | None = field(
        default=None, metadata=_help("Teacher-cache directory whose top-K columns are joined by sample_id.")
    )

    # The teacher as a service (training/teacher_service.py): an OpenAI-compatible server scores the teacher side.
    teacher_server_url: str | None = field(
        default=None, metadata=_help("Base URL (e.g. http://127.0.0.1:8000/v1) of an OpenAI-compatible server (vLLM "
                                     "serve, SGLang, llama.cpp server) that scores on-policy completions with top-K "
                                     "prompt log-probs instead of an in-process teacher; None = in-process teacher.")
    )
    teacher_server_model: str | None = field(
        default=None, metadata=_help("Model name to ask the server for; None = the one model it lists.")
    )
    teacher_server_top_k: int = field(
        default=16, metadata=_help("Teacher alternatives per completion position asked of the server (K).")
    )
    teacher_server_timeout: float = field(
        default=60.0, metadata=_help("Seconds one request to the teacher server may take (connect: at most 10).")
    )
    teacher_server_retries: int = field(
        default=3, metadata=_help("Retries (exponential backoff from 0.5 s) of a failed request before training "
                                  "stops resumably.")
    )
    teacher_server_concurrency: int = field(
        default=4, metadata=_help("Scoring requests in flight at a time.")
    )
    teacher_server_probe: str = field(
        default="auto", metadata=_help('Startup check of the server: "auto" (tokenizer agreement, plus log-probs '
                                       "against a local forward pass when a teacher model is given, used for the "
                                       'check only), "tokens" (no forward pass), "off" (needs a declared '
                                       "teacher_server_alignment).")
    )
    teacher_server_alignment: str = field(
        default="auto", metadata=_help('How the server\'s echoed prompt log-probs line up: "auto" (detected by the '
                                       'probe), "aligned" (OpenAI convention, vLLM) or "shifted" (one position late, '
                                       "the llama.cpp server on prompts without its BOS; corrected).")
    )
    teacher_server_api_key_env: str | None = field(
        default=None, metadata=_help("Environment variable holding the server's API key (sent as a Bearer token).")
    )

    # LoRA (peft).
    use_peft: bool = field(default=False, metadata=_help("Train LoRA adapters (peft) instead of all weights."))
    lora_r: int = field(default=16, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha."))
    lora_dropout: float = field(default=0.05, metadata=_help("LoRA dropout."))
    lora_target_modules: list[str] | None = field(
        default=None, metadata=_help("Module names to adapt; None = peft's default for the architecture.")
    )

    # vLLM (generation backend of the vLLM issue; fields kept with TRL's names and defaults).
    use_vllm: bool = field(default=False, metadata=_help("Generate on-policy completions with vLLM."))
    vllm_mode: str = field(default="colocate", metadata=_help('"colocate" or "server".'))
    vllm_server_base_url: str | None = field(default=None, metadata=_help("Base URL of the vLLM server."))
    vllm_server_host: str = field(default="0.0.0.0", metadata=_help("Host of the vLLM server."))
    vllm_server_port: int = field(default=8001, metadata=_help("Port of the vLLM server."))
    vllm_server_timeout: float = field(default=240.0, metadata=_help("Seconds to wait for the vLLM server."))
    vllm_group_port: int = field(default=51216, metadata=_help("Port of the vLLM weight-update group."))
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata=_help("GPU memory share of colocated vLLM."))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help("Tensor parallel size of colocated vLLM."))
    vllm_max_model_length: int | None = field(default=None, metadata=_help("Max model length of colocated vLLM."))
    vllm_model_impl: str = field(default="vllm", metadata=_help('"vllm" or "transformers".'))
    vllm_structured_outputs_regex: str | None = field(default=None, metadata=_help("Structured-output regex."))
    vllm_sync_frequency: int = field(default=1, metadata=_help("Sync student weights to vLLM every N steps."))
    vllm_enable_sleep_mode: bool = field(default=False, metadata=_help("Offload vLLM during the optimizer step."))

    # Logging.
    log_completions: bool = field(default=False, metadata=_help("Log (prompt, completion) samples."))
    log_completions_steps: int = field(default=100, metadata=_help("Steps between completion logs."))
    num_completions_to_print: int | None = field(default=None, metadata=_help("Completions printed per log."))
    wandb_log_unique_prompts: bool = field(default=True, metadata=_help("Accepted for TRL compatibility."))
    metrics_jsonl: str | None = field(
        default="metrics.jsonl", metadata=_help("jsonl file (relative to output_dir) receiving every log; None = off.")
    )

    def __post_init__(self) -> None:
        for name in ("teacher_model_init_kwargs", "model_init_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as error:
                    raise GoldInputError(f"{name} must be a dict or a JSON object string: {error}.") from None
        try:
            super().__post_init__()
        except GoldInputError:
            raise
        except ValueError as error:  # TrainingArguments' own checks: the same input-error type as every config
            raise GoldInputError(f"GOLDConfig: {error}") from error
        self._validate_gold_fields()

    def _validate_gold_fields(self) -> None:
        def fail(name: str, why: str) -> None:
            raise GoldInputError(f"GOLDConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("lmbda", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "must lie in [0, 1].")
        if self.temperature <= 0.0:
            fail("temperature", "must be positive (sampling divides logits by it).")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must lie in (0, 1].")
        if self.top_k < 0:
            fail("top_k", "must be >= 0 (0 disables top-k filtering).")
        if self.max_completion_length < 1:
            fail("max_completion_length", "must be at least 1.")
        if self.max_length is not None and self.max_completion_length >= self.max_length:
            fail(
                "max_completion_length",
                f"must be smaller than max_length={self.max_length} to leave room for the prompt; "
                "raise max_length or lower max_completion_length.",
            )
        if self.num_generations < 1:
            fail("num_generations", "must be at least 1.")
        window = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if self.num_generations > window:
            fail(
                "num_generations",
                f"the optimizer window of one process holds per_device_train_batch_size * "
                f"gradient_accumulation_steps = {window} sequences, fewer than num_generations; raise "
                "per_device_train_batch_size or gradient_accumulation_steps, or lower num_generations.",
            )
        if self.generation_batch_size is None:
            self.generation_batch_size = window // self.num_generations
        if self.generation_batch_size < 1 or self.generation_batch_size * self.num_generations != window:
            fail(
                "generation_batch_size",
                f"generation_batch_size * num_generations ({self.generation_batch_size} * {self.num_generations}) "
                f"must equal per_device_train_batch_size * gradient_accumulation_steps ({window}); leave it None "
                "or pick a divisor.",
            )
        canonical = MERGE_STRATEGY_ALIASES.get(self.uld_token_merge_strategy)
        if canonical is None:
            fail("uld_token_merge_strategy", f"must be one of {sorted(MERGE_STRATEGY_ALIASES)}.")
        if canonical != self.uld_token_merge_strategy:
            logger.info(
                "uld_token_merge_strategy=%r is TRL's name; using the %r merge (without TRL's logit shift).",
                self.uld_token_merge_strategy,
                canonical,
            )
            self.uld_token_merge_strategy = canonical
        if self.uld_groups_per_chunk < 1:
            fail("uld_groups_per_chunk", "must be at least 1.")
        if self.uld_keep_activations_mb < 0:
            fail("uld_keep_activations_mb", "must be >= 0 (0 = recompute every chunk).")
        if self.uld_loss_mode not in ULD_LOSS_MODES:
            fail("uld_loss_mode", f"must be one of {ULD_LOSS_MODES}.")
        if not self.use_extended_uld:
            fail("use_extended_uld", "only the exact byte alignment is implemented here (it works for every "
                 "tokenizer family, SentencePiece included); leave it True.")
        for name in ("uld_crossentropy_weight", "uld_distillation_weight"):
            if getattr(self, name) < 0.0:
                fail(name, "must be non-negative.")
        for name in ("uld_student_temperature", "uld_teacher_temperature"):
            if getattr(self, name) <= 0.0:
                fail(name, "must be positive.")
        if self.uld_skip_student_eos != self.uld_skip_teacher_eos:
            fail(
                "uld_skip_student_eos",
                f"differs from uld_skip_teacher_eos={self.uld_skip_teacher_eos}; the end-of-turn tokens form one "
                "aligned group only when both sides keep them, so set both True (skip) or both False (distill).",
            )
        matched, unmatched = self.uld_hybrid_matched_weight, self.uld_hybrid_unmatched_weight
        if (matched is None) != (unmatched is None):
            fail(
                "uld_hybrid_matched_weight",
                f"and uld_hybrid_unmatched_weight={unmatched} must both be None (adaptive) or both numbers.",
            )
        if matched is not None and (matched < 0.0 or unmatched < 0.0):
            fail("uld_hybrid_matched_weight", "hybrid weights must be non-negative.")
        if self.uld_use_projection_loss:
            if not (self.use_uld_loss and self.uld_use_hybrid_loss):
                fail("uld_use_projection_loss", "extends the hybrid loss; set use_uld_loss=True and "
                     "uld_use_hybrid_loss=True as well.")
            if self.uld_token_merge_strategy != "first":
                fail("uld_use_projection_loss", "compares next-token probabilities at each group's first position; "
                     'it needs uld_token_merge_strategy="first".')
        if self.uld_projection_weight is not None and self.uld_projection_weight < 0.0:
            fail("uld_projection_weight", "must be non-negative (or None for the matched weight).")
        if not 2 <= self.uld_projection_max_pieces <= 8:
            fail("uld_projection_max_pieces", "must lie in 2..8.")
        if self.teacher_server_url is not None:
            self._validate_teacher_server(fail)
        if self.use_peft:
            if self.lora_r < 1:
                fail("lora_r", "must be at least 1.")
            if not 0.0 <= self.lora_dropout < 1.0:
                fail("lora_dropout", "must lie in [0, 1).")
        if self.vllm_mode not in VLLM_MODES:
            fail("vllm_mode", f"must be one of {VLLM_MODES}.")
        if self.vllm_model_impl not in ("vllm", "transformers"):
            fail("vllm_model_impl", 'must be "vllm" or "transformers".')
        if self.vllm_sync_frequency < 1:
            fail("vllm_sync_frequency", "must be at least 1.")
        if self.log_completions_steps < 1:
            fail("log_completions_steps", "must be at least 1.")
        if self.num_generations > 1 and self.lmbda < 1.0:
            logger.warning(
                "num_generations=%d with lmbda=%s: off-policy slices repeat each sample %d times; "
                "consider lmbda=1.0.",
                self.num_generations,
                self.lmbda,
                self.num_generations,
            )

    def _validate_teacher_server(self, fail) -> None:
        from gold_pipeline.training.teacher_service import ALIGNMENTS, PROBE_MODES

        if not self.teacher_server_url.startswith(("http://", "https://")):
            fail("teacher_server_url", "must be an http:// or https:// base URL, e.g. http://127.0.0.1:8000/v1.")
        if self.teacher_server_top_k < 1:
            fail("teacher_server_top_k", "must be at least 1.")
        if self.teacher_server_timeout <= 0:
            fail("teacher_server_timeout", "must be positive (seconds).")
        if self.teacher_server_retries < 0:
            fail("teacher_server_retries", "must be >= 0.")
        if self.teacher_server_concurrency < 1:
            fail("teacher_server_concurrency", "must be at least 1.")
        if self.teacher_server_probe not in PROBE_MODES:
            fail("teacher_server_probe", f"must be one of {PROBE_MODES}.")
        if self.teacher_server_alignment not in ALIGNMENTS:
            fail("teacher_server_alignment", f"must be one of {ALIGNMENTS}.")
        if self.teacher_server_probe == "off" and self.teacher_server_alignment == "auto":
            fail("teacher_server_probe", "'off' skips the probe that detects the alignment: set "
                 "teacher_server_alignment to 'aligned' or 'shifted', or keep the probe.")
        if self.seq_kd:
            fail("seq_kd", "sequence-level KD samples from the teacher, which a served teacher scoring prompts does "
                 "not do here; set seq_kd=False or drop teacher_server_url.")
