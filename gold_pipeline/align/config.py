"""Options of `gold align` (DESIGN.md §2, §5), validated when built: every bad option is a GoldInputError."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gold_pipeline.cluster import check_executor
from gold_pipeline.data.sources import is_teacher_cache
from gold_pipeline.errors import GoldInputError

OVERLONG_POLICIES = ("truncate", "skip")
VOCAB_MAP_FILE = "vocab_map/vocab_map.parquet"
PROJECTION_FILE = "vocab_map/projection.parquet"  # student token -> teacher pieces (text.projection)


@dataclass
class AlignConfig:
    """Options of `gold align`. Written (resolved) into the output's manifest.json."""

    out: str  # output folder
    student_tokenizer: str  # pkg: name, local tokenizer/model dir, or hub id
    teacher_tokenizer: str | None = None  # same; None with teacher_cache = the cache's teacher tokenizer
    dataset: str | None = None  # .jsonl/.json/.parquet file or glob, data folder, hub id (or a teacher cache dir)
    teacher_cache: str | None = None  # output folder of `gold teacher-cache` (instead of dataset)
    split: str = "train"
    dataset_config: str | None = None  # hub dataset configuration name
    student_tokenizer_revision: str | None = None
    teacher_tokenizer_revision: str | None = None
    student_chat_template: str | None = None  # Jinja template FILE for the student (default: its own/built-in)
    teacher_chat_template: str | None = None  # Jinja template FILE for the teacher
    shard_size: int = 1000  # source rows per shard
    num_workers: int = 1  # processes; 1 = in this process
    executor: str = "local"  # "local" (this process / a process pool) | "ray" (one Ray task per shard)
    ray_address: str | None = None  # with executor "ray": HOST:PORT, ray://HOST:PORT or "auto"; None = local cluster
    max_length: int | None = None  # max prompt + completion tokens per side; None = no limit
    overlong: str = "truncate"  # policy for rows over max_length: "truncate" | "skip"
    resume: bool = False  # finish an interrupted run in `out` (keeps finished shards)
    overwrite: bool = False  # replace a previous output in `out`
    skip_invalid: bool = False  # skip invalid rows (counted per reason) instead of stopping with an error
    progress: bool | None = None  # progress bar; None = when stderr is a terminal

    def __post_init__(self) -> None:
        if not self.out:
            raise GoldInputError("--out is required: the folder to write the aligned shards to.")
        if not self.student_tokenizer:
            raise GoldInputError("--student-tokenizer is required (a pkg: name, local path or hub id).")
        if (self.dataset is None) == (self.teacher_cache is None):
            raise GoldInputError("Give exactly one of --dataset or --teacher-cache as the source of rows.")
        if self.dataset is not None and is_teacher_cache(self.dataset):
            # a teacher cache given as --dataset is read as one (cached teacher ids, tokenizer check)
            self.dataset, self.teacher_cache = None, self.dataset
        if self.teacher_cache is not None:
            if not Path(self.teacher_cache).is_dir():
                raise GoldInputError(f"--teacher-cache {self.teacher_cache} is not a folder: pass the --out folder "
                                     f"of `gold teacher-cache`.")
            if self.teacher_chat_template is not None:
                raise GoldInputError("--teacher-chat-template cannot be used with --teacher-cache: the cache already "
                                     "holds the teacher's prompt ids rendered with its template.")
        elif not self.teacher_tokenizer:
            raise GoldInputError("--teacher-tokenizer is required unless --teacher-cache names the teacher.")
        for name in ("student_chat_template", "teacher_chat_template"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise GoldInputError(f"--{name.replace('_', '-')} {path} is not a file: pass a Jinja template file.")
        if self.shard_size < 1:
            raise GoldInputError(f"--shard-size must be at least 1, got {self.shard_size}.")
        if self.num_workers < 1:
            raise GoldInputError(f"--num-workers must be at least 1, got {self.num_workers}.")
        if self.max_length is not None and self.max_length < 2:
            raise GoldInputError(f"--max-length must be at least 2 tokens (or unset), got {self.max_length}.")
        if self.overlong not in OVERLONG_POLICIES:
            raise GoldInputError(f"--overlong must be one of {OVERLONG_POLICIES}, got {self.overlong!r}.")
        check_executor(self.executor, self.ray_address)
        if self.resume and self.overwrite:
            raise GoldInputError("--resume and --overwrite exclude each other: pick one.")

    @property
    def source(self) -> str:
        return self.teacher_cache if self.teacher_cache is not None else self.dataset  # type: ignore[return-value]
