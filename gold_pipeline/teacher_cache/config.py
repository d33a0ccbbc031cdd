"""Configuration of `gold teacher-cache` (one dataclass; validated on construction; written into the manifest)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from gold_pipeline.cluster import check_executor
from gold_pipeline.errors import GoldInputError

BACKENDS = ("hf", "vllm", "openai")
MAX_TOP_K = 1024


@dataclass
class TeacherCacheConfig:
    """Everything one `gold teacher-cache` run needs.

    Sampling: `temperature` 0 means greedy; `top_p`/`sampling_top_k` filter before sampling. The stored
    log-probs are always the teacher's *raw* distribution (temperature 1, no filtering): that is what the
    distillation losses compare against, the sampling knobs only choose which completion gets scored.
    """

    dataset: str                                  # jsonl/json/parquet path, hub id, or a teacher-cache dir
    out: Path                                     # output directory (part-XXXXX.parquet + manifest.json)
    teacher: str                                  # model: hub id, local path, pkg: name; openai: served model name
    split: str = "train"
    teacher_revision: str | None = None
    teacher_tokenizer: str | None = None          # default: the teacher's own (pkg models: their pkg tokenizer)
    chat_template: str | None = None              # path of a template file overriding the tokenizer's own
    backend: str = "hf"                           # hf | vllm | openai
    top_k: int = 64                               # K log-probs stored per completion token; 0 = completions only
    num_generations: int = 1                      # samples per prompt (sample_id includes the generation index)
    temperature: float = 1.0                      # 0 = greedy
    top_p: float = 1.0
    sampling_top_k: int = 0                       # 0 = no top-k filter when sampling
    seed: int = 0                                 # every sample is seeded from (seed, sample_id): resume reproduces it
    max_new_tokens: int = 256
    score_only: bool = False                      # keep the dataset's completions, store teacher log-probs of them
    max_examples: int | None = None               # only the first N dataset rows
    skip_invalid: bool = False                    # count and skip bad rows instead of stopping with an error
    batch_size: int = 8                           # prompts per generation/scoring batch (hf); requests in flight (vllm)
    rows_per_shard: int = 256                     # prompts per shard (x num_generations rows)
    resume: bool = False
    overwrite: bool = False
    # hf backend
    dtype: str = "auto"                           # model weights: auto | float32 | bfloat16 | float16
    device: str = "auto"                          # auto | cpu | cuda | cuda:N
    max_context: int | None = None                # default: the model's max_position_embeddings
    # data parallel: num_workers local processes, or rank/world from the launcher's env (accelerate/torchrun)
    num_workers: int = 1
    rank: int | None = None
    world_size: int | None = None
    # --executor ray: num_workers Ray actors (each holds one backend), one task per shard
    executor: str = "local"                       # local | ray
    ray_address: str | None = None                # HOST:PORT, ray://HOST:PORT or auto; None = a local Ray cluster
    # vllm backend
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    model_impl: str = "auto"                      # auto | vllm | transformers
    # openai backend
    base_url: str | None = None                   # e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"           # name of the env variable holding the key (never stored)
    concurrency: int = 4
    request_timeout_s: float = 300.0
    max_retries: int = 5
    prompt_format: str = "auto"                   # openai: send prompt as "ids", "text", or "auto" (ids, else text)
    progress: bool = True
    extra: dict = field(default_factory=dict)     # free-form notes copied into the manifest

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.dataset:
            raise GoldInputError("--dataset is required: a jsonl/json/parquet file, a hub dataset id or a directory.")
        if not self.teacher:
            raise GoldInputError("--teacher is required: a hub id, a local model directory or a pkg: name.")
        if self.backend not in BACKENDS:
            raise GoldInputError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}.")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise GoldInputError(f"--top-k must be between 0 (completions only) and {MAX_TOP_K}, got {self.top_k}.")
        if self.num_generations < 1:
            raise GoldInputError(f"--num-generations must be >= 1, got {self.num_generations}.")
        if self.score_only and self.num_generations != 1:
            raise GoldInputError("--score-only scores the dataset's own completion: use --num-generations 1.")
        if self.score_only and self.top_k == 0:
            raise GoldInputError("--score-only with --top-k 0 would store nothing new; use --top-k >= 1.")
        if self.temperature < 0:
            raise GoldInputError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise GoldInputError(f"--top-p must be in (0, 1], got {self.top_p}.")
        if self.sampling_top_k < 0:
            raise GoldInputError(f"--sampling-top-k must be >= 0 (0 = off), got {self.sampling_top_k}.")
        if self.max_new_tokens < 1:
            raise GoldInputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}.")
        if self.batch_size < 1 or self.rows_per_shard < 1:
            raise GoldInputError("--batch-size and --rows-per-shard must be >= 1.")
        if self.resume and self.overwrite:
            raise GoldInputError("--resume and --overwrite exclude each other: pick one.")
        if self.num_workers < 1:
            raise GoldInputError(f"--num-workers must be >= 1, got {self.num_workers}.")
        if (self.rank is None) != (self.world_size is None):
            raise GoldInputError("rank and world_size go together (or leave both unset to read the launcher's env).")
        if self.world_size is not None and not 0 <= self.rank < self.world_size:
            raise GoldInputError(f"rank {self.rank} is outside world size {self.world_size}.")
        if self.num_workers > 1 and self.world_size not in (None, 1):
            raise GoldInputError(
                "Use either --num-workers (local processes) or a launcher's rank/world size, not both.")
        check_executor(self.executor, self.ray_address)
        if self.executor == "ray" and self.world_size not in (None, 1):
            raise GoldInputError("Use either --executor ray or a launcher's rank/world size, not both.")
        if self.max_context is not None and self.max_context < 2:
            raise GoldInputError(f"--max-context must be >= 2, got {self.max_context}.")
        if self.backend == "openai":
            if not self.base_url:
                raise GoldInputError("--backend openai needs --base-url, e.g. http://127.0.0.1:8000/v1.")
            if self.score_only:
                raise GoldInputError(
                    "--score-only is not supported by --backend openai: completion servers only score a given "
                    "text through echo=true prompt log-probs, which were found shifted by one position on "
                    "llama.cpp. Score with --backend hf or --backend vllm instead."
                )
            if self.concurrency < 1 or self.max_retries < 0 or self.request_timeout_s <= 0:
                raise GoldInputError("--concurrency >= 1, --max-retries >= 0 and --request-timeout-s > 0 are required.")
            if self.prompt_format not in ("auto", "ids", "text"):
                raise GoldInputError(f"--prompt-format must be auto, ids or text, got {self.prompt_format!r}.")
        if self.backend == "vllm":
            if self.tensor_parallel_size < 1:
                raise GoldInputError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}.")
            if not 0 < self.gpu_memory_utilization <= 1:
                raise GoldInputError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
            if self.model_impl not in ("auto", "vllm", "transformers"):
                raise GoldInputError(f"--model-impl must be auto, vllm or transformers, got {self.model_impl!r}.")

    def to_dict(self) -> dict:
        """JSON-ready resolved config for the manifest (paths as strings)."""
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        return data
