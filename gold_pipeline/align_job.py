"""`gold align`: dataset (or teacher cache) -> aligned Parquet shards + vocab map + manifest (DESIGN.md §2, §5).

Per row:
  student_prompt_ids  = render_prompt_ids(student, prompt)        each side renders its OWN chat template
  teacher_prompt_ids  = render_prompt_ids(teacher, prompt)        (teacher cache: the cached ids, untouched)
  *_completion_ids    = encode_completion(side, completion_text)  each side tokenizes the completion on its own
                        + end_of_turn_ids(side)                   group id -1 (teaches the student to stop)
  groups              = alignment.align_completion(...)           byte-exact groups, -1 = excluded tail
A shard does this for all its rows at once (process_shard): one batch tokenization per side, one vectorized
alignment (alignment.align_flat) and Arrow columns built from the flat arrays; align_example is the one-row form
(used for rows cut to max_length and rows from a teacher cache, and as the reference in the tests).
With a teacher cache as the source, the teacher's completion ids are the cached generated ids (their trailing
end-of-turn/EOS included), the top-k columns are carried over, and the student gets its end-of-turn ids only
when the teacher stopped (finish_reason != "length").

Overlong rows (`max_length` = prompt + completion tokens, checked on each side):
  "truncate" (default): cut the completion at the last common group boundary (that is also a UTF-8 character
             boundary) where both sides fit; no end-of-turn ids are appended to a cut completion; the row's
             `truncated` is true and completion_text is the kept text. A prompt that alone does not fit, or a
             cut that keeps no group, skips the row (counted as `skipped.too_long`).
  "skip":    skip the row and count it (`skipped.too_long`).

Row k of the source (0-based) goes to shard k // shard_size, so `--resume` redoes exactly the unfinished shards
and the output equals that of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from gold_pipeline.schemas import ALIGNED_SCHEMA, VOCAB_MAP_SCHEMA
from gold_pipeline.shards import (
    GoldInputError,
    ShardWriter,
    check_fingerprint,
    check_run_identity,
    merge_stats,
    prepare_output_dir,
    read_manifest,
    write_table_atomic,
)
from gold_pipeline.tokenization import encode_completions, render_prompts_ids
from gold_pipeline.sources import (
    Example,
    InvalidRow,
    InvalidRowError,
    dataset_fingerprint,
    is_teacher_cache,
    iter_parsed,
)

OVERLONG_POLICIES = ("truncate", "skip")
VOCAB_MAP_FILE = "vocab_map/vocab_map.parquet"
# Test hook: seconds to sleep after each finished shard, so a test can kill a run between shards.
_SHARD_DELAY_ENV = "GOLD_ALIGN_TEST_SHARD_DELAY"


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
        if self.resume and self.overwrite:
            raise GoldInputError("--resume and --overwrite exclude each other: pick one.")

    @property
    def source(self) -> str:
        return self.teacher_cache if self.teacher_cache is not None else self.dataset  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------
# Tokenizer sides
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker needs to load one side's tokenizer exactly as the main process did."""

    name: str
    revision: str | None
    chat_template: str | None  # template text from a file, or None


@dataclass
class Side:
    tokenizer: Any
    table: Any  # byte_tables.ByteTable
    eot_ids: np.ndarray  # (E,) int32 end-of-turn ids


@functools.lru_cache(maxsize=8)
def load_side(spec: TokenizerSpec) -> Side:
    """Tokenizer, byte table and end-of-turn ids of one side (cached per process: loading a 100k+ vocabulary
    takes seconds)."""
    from gold_pipeline.byte_tables import byte_table
    from gold_pipeline.tokenization import end_of_turn_ids, load_tokenizer

    tokenizer = load_tokenizer(spec.name, revision=spec.revision, chat_template=spec.chat_template)
    return Side(tokenizer, byte_table(tokenizer), np.asarray(end_of_turn_ids(tokenizer), dtype=np.int32))


def tokenizer_record(spec: TokenizerSpec, side: Side, template_file: str | None = None) -> dict[str, Any]:
    """Fingerprint entry of one tokenizer for manifests (the same layout for every stage)."""
    from gold_pipeline.tokenization import tokenizer_fingerprint

    template = side.tokenizer.chat_template if isinstance(side.tokenizer.chat_template, str) else ""
    return {
        "name": spec.name,
        "revision": spec.revision,
        "sha256": tokenizer_fingerprint(side.tokenizer),
        "vocab_size": len(side.table.token_bytes),
        "chat_template_source": side.tokenizer.gold_chat_template_source,
        "chat_template_file": str(Path(template_file).resolve()) if template_file else None,
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "end_of_turn_ids": side.eot_ids.tolist(),
    }


# --------------------------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------------------------


class OverlongRow(Exception):
    """Raised by align_example when a row cannot be kept under max_length (counted as skipped.too_long)."""


def _group_ends(group_ids: np.ndarray, num_groups: int) -> np.ndarray:
    """(G,) index one past the last token of each group. group_ids (n,) non-decreasing where >= 0."""
    positions = np.flatnonzero(group_ids >= 0)
    valid = group_ids[positions]
    last = np.searchsorted(valid, np.arange(num_groups), side="right") - 1  # (G,) into positions
    return positions[last] + 1


def _cut_point(student_groups, teacher_groups, num_groups, student_budget, teacher_budget, group_byte_ends,
               text_bytes) -> int:
    """Number of groups to keep so both sides fit their budgets and the cut is a UTF-8 character boundary."""
    if num_groups == 0:
        return 0
    student_ends = _group_ends(student_groups, num_groups)  # (G,)
    teacher_ends = _group_ends(teacher_groups, num_groups)  # (G,)
    padded = np.frombuffer(text_bytes + b"\x00", dtype=np.uint8)
    at_char_start = (padded[group_byte_ends] & 0xC0) != 0x80  # (G,) next byte is not a continuation byte
    fits = (student_ends <= student_budget) & (teacher_ends <= teacher_budget) & at_char_start
    kept = np.flatnonzero(fits)
    return int(kept[-1]) + 1 if len(kept) else 0


def _side_ids(tokenizer: Any, messages: list[dict], text: str, prompt_ids: list[int] | None,
              completion_ids: list[int] | None, eot_ids: np.ndarray | None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One side's (prompt, completion, end-of-turn) int32 ids; what the caller already tokenized (batched per
    shard) is used as is, the rest is tokenized here."""
    from gold_pipeline.tokenization import encode_completion, end_of_turn_ids, render_prompt_ids

    if prompt_ids is None:
        prompt_ids = render_prompt_ids(tokenizer, messages)
    if completion_ids is None:
        completion_ids = encode_completion(tokenizer, text)
    if eot_ids is None:
        eot_ids = end_of_turn_ids(tokenizer)
    return (np.asarray(prompt_ids, dtype=np.int32), np.asarray(completion_ids, dtype=np.int32),  # (p,), (n,)
            np.asarray(eot_ids, dtype=np.int32))


def align_example(
    example: Example,
    student_tok: Any,
    teacher_tok: Any,
    student_table: Any,
    teacher_table: Any,
    max_length: int | None = None,
    *,
    overlong: str = "truncate",
    student_eot_ids: np.ndarray | None = None,
    teacher_eot_ids: np.ndarray | None = None,
    student_completion_ids: list[int] | None = None,
    teacher_completion_ids: list[int] | None = None,
    student_prompt_ids: list[int] | None = None,
    teacher_prompt_ids: list[int] | None = None,
    alignment: Any = None,
) -> dict[str, Any]:
    """One aligned output row (numpy arrays for the list columns). Raises OverlongRow when it must be skipped.

    *_completion_ids / *_prompt_ids: the completion / prompt already tokenized by `encode_completions` /
    `render_prompts_ids` (batched per shard); None tokenizes it here. alignment: align_completion of exactly these
    completion ids and text (from align_batch), for a row that is not from a teacher cache; None computes it."""
    from gold_pipeline.alignment import align_completion
    from gold_pipeline.byte_tables import completion_byte_lengths
    text = example.completion_text
    assert text is not None, "align_example needs a completion"
    student_prompt, student_completion, student_eot_ids = _side_ids(
        student_tok, example.prompt_messages, text, student_prompt_ids, student_completion_ids, student_eot_ids)
    extra = example.extra
    cached = "teacher_completion_ids" in extra
    if cached:
        teacher_prompt = np.asarray(extra["teacher_prompt_ids"], dtype=np.int32)
        cached_ids = np.asarray(extra["teacher_completion_ids"], dtype=np.int32)  # (m,) incl. trailing EOS
        vocab = len(teacher_table.lengths)
        if len(cached_ids) and (cached_ids.min() < 0 or cached_ids.max() >= vocab):
            raise GoldInputError(
                f"Teacher cache row {example.row_index}: completion ids outside the teacher vocabulary (size "
                f"{vocab}); the cache was made with another tokenizer. Pass the cache's teacher tokenizer."
            )
        # trailing special tokens (EOS / end of turn) have no bytes: align the text part, give them -1
        zero = teacher_table.lengths[cached_ids] == 0
        text_len = len(cached_ids) - int(np.argmin(zero[::-1])) if not zero.all() else 0
        teacher_completion, teacher_tail = cached_ids[:text_len], cached_ids[text_len:]
        finished = extra.get("finish_reason") != "length"
    else:
        teacher_prompt, teacher_completion, teacher_tail = _side_ids(
            teacher_tok, example.prompt_messages, text, teacher_prompt_ids, teacher_completion_ids, teacher_eot_ids)
        finished = True
    student_tail = student_eot_ids if finished else np.zeros(0, dtype=np.int32)

    if alignment is None or cached:
        alignment = align_completion(student_completion, teacher_completion, student_table, teacher_table, text=text)
    student_groups = np.asarray(alignment.student_group_ids, dtype=np.int32)  # (n,)
    teacher_groups = np.asarray(alignment.teacher_group_ids, dtype=np.int32)  # (m,)
    num_groups = int(alignment.num_groups)
    status = alignment.status
    excluded = (int(alignment.excluded_student_tokens), int(alignment.excluded_teacher_tokens))
    truncated = False
    teacher_cut = len(teacher_completion) + len(teacher_tail)  # teacher tokens kept (for the top-k columns)

    student_total = len(student_prompt) + len(student_completion) + len(student_tail)
    teacher_total = len(teacher_prompt) + teacher_cut
    if max_length is not None and (student_total > max_length or teacher_total > max_length):
        if overlong == "skip":
            raise OverlongRow(example.row_index)
        text_bytes = text.encode("utf-8")
        strip = student_table.dummy_prefix and not (student_table.dummy_prefix_conditional and text[:1] == " ")
        student_lengths = completion_byte_lengths(student_table, student_completion, strip_dummy_prefix=strip)  # (n,)
        byte_ends = np.cumsum(student_lengths)[_group_ends(student_groups, num_groups) - 1] if num_groups else \
            np.zeros(0, dtype=np.int64)  # (G,) byte offset where each group ends
        keep = _cut_point(student_groups, teacher_groups, num_groups, max_length - len(student_prompt),
                          max_length - len(teacher_prompt), byte_ends, text_bytes)
        if keep == 0:
            raise OverlongRow(example.row_index)
        student_cut = int(_group_ends(student_groups, keep)[-1])
        teacher_cut = int(_group_ends(teacher_groups, keep)[-1])
        student_completion, student_groups = student_completion[:student_cut], student_groups[:student_cut]
        teacher_completion, teacher_groups = teacher_completion[:teacher_cut], teacher_groups[:teacher_cut]
        text = text_bytes[: int(byte_ends[keep - 1])].decode("utf-8")
        num_groups, status, excluded, truncated = keep, "ok", (0, 0), True
        student_tail = teacher_tail = np.zeros(0, dtype=np.int32)

    minus = lambda tail: np.full(len(tail), -1, dtype=np.int32)  # noqa: E731
    row = {
        "sample_id": example.sample_id,
        "row_index": example.row_index,
        "generation_index": example.generation_index,
        "completion_text": text,
        "student_prompt_ids": student_prompt,
        "student_completion_ids": np.concatenate([student_completion, student_tail]),
        "teacher_prompt_ids": teacher_prompt,
        "teacher_completion_ids": np.concatenate([teacher_completion, teacher_tail]),
        "student_group_ids": np.concatenate([student_groups, minus(student_tail)]),
        "teacher_group_ids": np.concatenate([teacher_groups, minus(teacher_tail)]),
        "num_groups": num_groups,
        "status": status,
        "truncated": truncated,
        "excluded_student_tokens": excluded[0],
        "excluded_teacher_tokens": excluded[1],
        "finish_reason": extra.get("finish_reason") if cached else None,
        "teacher_token_logprobs": None,
        "teacher_topk_ids": None,
        "teacher_topk_logprobs": None,
    }
    if cached:
        for name in ("teacher_token_logprobs", "teacher_topk_ids", "teacher_topk_logprobs"):
            value = extra.get(name)
            row[name] = None if value is None else value[:teacher_cut]
    return row


# --------------------------------------------------------------------------------------------------------------
# One shard
# --------------------------------------------------------------------------------------------------------------


def _list_column(values: list[np.ndarray | None], type_: pa.DataType) -> pa.Array:
    """Rows of 1-D (list<T>) or 2-D (list<list<T>>) numpy arrays -> one Arrow list column, built from offsets."""
    lengths = np.array([0 if v is None else len(v) for v in values], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    mask = pa.array([v is None for v in values]) if any(v is None for v in values) else None
    present = [v for v in values if v is not None]
    item_type = type_.value_type
    if pa.types.is_list(item_type):  # (m, K) per row
        inner_k = np.concatenate([np.full(len(v), v.shape[1] if v.ndim == 2 else 0, dtype=np.int32)
                                  for v in present]) if present else np.zeros(0, np.int32)
        inner_offsets = pa.array(np.concatenate([[0], np.cumsum(inner_k)]).astype(np.int32))
        flat = np.concatenate([v.reshape(-1) for v in present]) if present else np.zeros(0)
        leaf = pa.array(flat.astype(item_type.value_type.to_pandas_dtype()), type=item_type.value_type)
        child = pa.ListArray.from_arrays(inner_offsets, leaf, type=item_type)
    else:
        flat = np.concatenate(present) if present else np.zeros(0)
        child = pa.array(flat.astype(item_type.to_pandas_dtype()), type=item_type)
    return pa.ListArray.from_arrays(offsets, child, type=type_, mask=mask)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Aligned rows (numpy list columns) -> a table with exactly ALIGNED_SCHEMA, without per-element Python."""
    columns = []
    for field in ALIGNED_SCHEMA:
        values = [row[field.name] for row in rows]
        if pa.types.is_list(field.type):
            columns.append(_list_column(values, field.type))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=ALIGNED_SCHEMA)


def _count_row(counts: Counter, row: dict[str, Any]) -> int:
    """Add one row's counts to `counts` (keys are paths like ("student", "prompt_tokens")); returns the row's
    completion tokens (both sides) for the progress bar."""
    counts[("rows",)] += 1
    counts[("groups",)] += row["num_groups"]
    counts[("truncated_rows",)] += int(row["truncated"])
    counts[("completion_bytes",)] += len(row["completion_text"].encode("utf-8"))
    counts[("rows_by_status", row["status"])] += 1
    counts[("rows_with_teacher_topk",)] += int(row["teacher_topk_ids"] is not None)
    tokens = 0
    for side in ("student", "teacher"):
        groups = row[f"{side}_group_ids"]
        sizes = np.bincount(groups[groups >= 0], minlength=row["num_groups"])  # (G,) tokens per group
        excluded = int(row[f"excluded_{side}_tokens"])
        completion = len(row[f"{side}_completion_ids"])
        tokens += completion
        counts[(side, "prompt_tokens")] += len(row[f"{side}_prompt_ids"])
        counts[(side, "completion_tokens")] += completion
        counts[(side, "grouped_tokens")] += int(sizes.sum())
        counts[(side, "multi_token_groups")] += int((sizes > 1).sum())
        counts[(side, "excluded_tokens")] += excluded
        counts[(side, "zero_byte_tokens")] += int((groups < 0).sum()) - excluded  # end of turn, specials
    return tokens


def _nest(counts: Counter) -> dict[str, Any]:
    """{("a", "b"): n} -> {"a": {"b": n}} with the shard-stat keys always present."""
    stats: dict[str, Any] = {"source_rows": 0, "rows": 0, "groups": 0, "completion_bytes": 0, "truncated_rows": 0,
                             "rows_by_status": {}, "invalid": {}, "skipped": {}, "rows_with_teacher_topk": 0}
    for path, value in sorted(counts.items()):
        node = stats
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = int(value)
    return stats


def process_shard(
    items: list[Example | InvalidRow],
    student: Side,
    teacher: Side,
    cfg: AlignConfig,
    progress: Callable[[int, int], None] | None = None,
    *,
    threads: int | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Align the rows of one shard. Returns the table and the shard's stats (summable across shards).

    Both sides' completions and prompts are tokenized in one batch call per side and the alignment runs over
    the whole shard at once (alignment.align_flat); rows that fit max_length and are not from a teacher cache
    become Arrow columns straight from the flat arrays (_fresh_table). The others (over max_length, cached
    teacher ids) go through align_example one by one. threads: for align_flat (1 inside worker processes).
    """
    counts: Counter = Counter()
    counts[("source_rows",)] += len(items)
    examples: list[Example] = []
    for item in items:
        if isinstance(item, InvalidRow):
            if not cfg.skip_invalid:
                raise InvalidRowError(item)
            counts[("invalid", item.reason)] += 1
        else:
            examples.append(item)
    if not examples:
        return rows_to_table([]), _nest(counts)
    texts = [example.completion_text for example in examples]
    student_ids = _encode(student.tokenizer, texts, examples)
    student_prompts = render_prompts_ids(student.tokenizer, [e.prompt_messages for e in examples])
    fresh = [k for k, example in enumerate(examples) if "teacher_completion_ids" not in example.extra]
    fresh_examples = [examples[k] for k in fresh]
    teacher_ids = _encode(teacher.tokenizer, [texts[k] for k in fresh], fresh_examples)
    teacher_prompts = render_prompts_ids(teacher.tokenizer, [e.prompt_messages for e in fresh_examples])

    batch = None
    fits = np.zeros(len(fresh), dtype=bool)  # (F,) fresh rows within max_length on both sides
    if fresh:
        from gold_pipeline.alignment import align_flat

        s_prompt, s_prompt_starts = _flat_ids([student_prompts[k] for k in fresh])  # (P,), (F+1,)
        s_ids, s_starts = _flat_ids([student_ids[k] for k in fresh])  # (N,), (F+1,)
        t_prompt, t_prompt_starts = _flat_ids(teacher_prompts)
        t_ids, t_starts = _flat_ids(teacher_ids)
        batch = align_flat(s_ids, s_starts, t_ids, t_starts, student.table, teacher.table,
                           [texts[k] for k in fresh], threads=threads)  # fmt: skip
        fits[:] = True
        if cfg.max_length is not None:
            s_total = np.diff(s_prompt_starts) + np.diff(s_starts) + student.eot_ids.size  # (F,)
            t_total = np.diff(t_prompt_starts) + np.diff(t_starts) + teacher.eot_ids.size
            fits = (s_total <= cfg.max_length) & (t_total <= cfg.max_length)

    # rows one by one: over max_length, or cached teacher ids
    in_batch = dict(zip(fresh, range(len(fresh))))
    alignments = batch.rows() if batch is not None and not fits.all() else None
    slow_rows, slow_positions = [], []
    for k, example in enumerate(examples):
        f = in_batch.get(k)
        if f is not None and fits[f]:
            continue
        try:
            row = align_example(example, student.tokenizer, teacher.tokenizer, student.table, teacher.table,
                                cfg.max_length, overlong=cfg.overlong, student_eot_ids=student.eot_ids,
                                teacher_eot_ids=teacher.eot_ids, student_completion_ids=student_ids[k],
                                teacher_completion_ids=None if f is None else teacher_ids[f],
                                student_prompt_ids=student_prompts[k],
                                teacher_prompt_ids=None if f is None else teacher_prompts[f],
                                alignment=None if f is None else alignments[f])  # fmt: skip
        except OverlongRow:
            counts[("skipped", "too_long")] += 1
            continue
        _count_row(counts, row)
        slow_rows.append(row)
        slow_positions.append(k)

    tables, positions = [], []
    if fits.any():
        keep = np.flatnonzero(fits)  # (F',) into fresh
        tables.append(_fresh_table([fresh_examples[f] for f in keep.tolist()], batch, keep, s_prompt,
                                   s_prompt_starts, s_ids, t_prompt, t_prompt_starts, t_ids, student.eot_ids,
                                   teacher.eot_ids, counts))  # fmt: skip
        positions.append(np.asarray(fresh, dtype=np.int64)[keep])
    if slow_rows:
        tables.append(rows_to_table(slow_rows))
        positions.append(np.asarray(slow_positions, dtype=np.int64))
    if not tables:
        table = rows_to_table([])
    elif len(tables) == 1:
        table = tables[0]
    else:  # both kinds in one shard: back to source order
        table = pa.concat_tables(tables).take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))
        table = table.combine_chunks()
    if progress is not None and table.num_rows:
        progress(table.num_rows, counts[("student", "completion_tokens")] + counts[("teacher", "completion_tokens")])
    return table, _nest(counts)


def _encode(tokenizer: Any, texts: list[str], examples: list[Example]) -> list[list[int]]:
    """encode_completions, with an error that names the row when a completion cannot be tokenized."""
    try:
        return encode_completions(tokenizer, texts)
    except (TypeError, UnicodeError, ValueError) as error:
        for example, text in zip(examples, texts):
            try:
                encode_completions(tokenizer, [text])
            except (TypeError, UnicodeError, ValueError):
                raise GoldInputError(f"Row {example.row_index}: its completion cannot be tokenized ({error}); fix "
                                     f"or drop that row.") from error  # fmt: skip
        raise


def _flat_ids(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,) int32 of all rows back to back, starts (R+1,) int64)."""
    import itertools

    starts = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)), out=starts[1:])
    ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(starts[-1]))
    return ids, starts


def _take_rows(values: np.ndarray, starts: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows `rows` (sorted) of a flat (values, starts) pair, as a new flat pair."""
    if rows.size == starts.size - 1:
        return values, starts
    counts = np.diff(starts)[rows]  # (R',)
    new_starts = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(counts, out=new_starts[1:])
    index = np.repeat(starts[:-1][rows] - new_starts[:-1], counts) + np.arange(new_starts[-1], dtype=np.int64)
    return values[index], new_starts


def _append_tail(values: np.ndarray, starts: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row of a flat (values, starts) pair followed by `tail` (E,): the new flat pair."""
    count, size = starts.size - 1, tail.size
    if size == 0:
        return values, starts
    out = np.insert(values, np.repeat(starts[1:], size), np.tile(tail.astype(values.dtype), count))
    return out, starts + size * np.arange(count + 1, dtype=np.int64)


def _ids_column(values: np.ndarray, starts: np.ndarray) -> pa.Array:
    """A list<int32> column from a flat (values, starts) pair (as _list_column builds it)."""
    from gold_pipeline.schemas import IDS

    offsets = pa.array(starts.astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.int32), type=pa.int32()), type=IDS)


def _fresh_table(examples: list[Example], batch: Any, keep: np.ndarray, s_prompt, s_prompt_starts, s_ids,
                 t_prompt, t_prompt_starts, t_ids, student_eot: np.ndarray, teacher_eot: np.ndarray,
                 counts: Counter) -> pa.Table:
    """The aligned table of the fresh rows `keep` of `batch` (none over max_length), built from the flat
    arrays; adds their stats to `counts` (what _count_row adds per row)."""
    count = len(examples)
    student_prompt, student_prompt_starts = _take_rows(s_prompt, s_prompt_starts, keep)
    teacher_prompt, teacher_prompt_starts = _take_rows(t_prompt, t_prompt_starts, keep)
    student_ids, student_starts = _take_rows(s_ids, batch.student_starts, keep)
    teacher_ids, teacher_starts = _take_rows(t_ids, batch.teacher_starts, keep)
    student_groups, _ = _take_rows(batch.student_group_ids, batch.student_starts, keep)
    teacher_groups, _ = _take_rows(batch.teacher_group_ids, batch.teacher_starts, keep)
    num_groups = batch.num_groups[keep]  # (R,)
    excluded_student = batch.excluded_student_tokens[keep]
    excluded_teacher = batch.excluded_teacher_tokens[keep]
    status = [batch.status[f] for f in keep.tolist()]
    texts = [example.completion_text for example in examples]

    counts[("rows",)] += count
    counts[("groups",)] += int(num_groups.sum())
    counts[("truncated_rows",)] += 0
    counts[("completion_bytes",)] += sum(len(text.encode("utf-8")) for text in texts)
    for name, number in Counter(status).items():
        counts[("rows_by_status", name)] += number
    counts[("rows_with_teacher_topk",)] += 0
    group_offsets = np.zeros(count, dtype=np.int64)  # (R,) groups of the rows before
    np.cumsum(num_groups[:-1], out=group_offsets[1:])
    sides = {}
    for side, ids, starts, groups, prompt, excluded, tail in (
        ("student", student_ids, student_starts, student_groups, student_prompt, excluded_student, student_eot),
        ("teacher", teacher_ids, teacher_starts, teacher_groups, teacher_prompt, excluded_teacher, teacher_eot),
    ):
        grouped = groups >= 0  # (n,)
        rows_of = np.repeat(np.arange(count), np.diff(starts))  # (n,) row of each token
        sizes = np.bincount(groups[grouped] + group_offsets[rows_of[grouped]], minlength=int(num_groups.sum()))
        completion = ids.size + count * tail.size  # with the end-of-turn ids
        counts[(side, "prompt_tokens")] += prompt.size
        counts[(side, "completion_tokens")] += completion
        counts[(side, "grouped_tokens")] += int(sizes.sum())
        counts[(side, "multi_token_groups")] += int((sizes > 1).sum())
        counts[(side, "excluded_tokens")] += int(excluded.sum())
        counts[(side, "zero_byte_tokens")] += completion - int(grouped.sum()) - int(excluded.sum())
        sides[side] = (_append_tail(ids, starts, tail), _append_tail(groups, starts, np.full(tail.size, -1)))

    (student_ids, student_starts), (student_groups, _) = sides["student"]
    (teacher_ids, teacher_starts), (teacher_groups, _) = sides["teacher"]
    nothing = [None] * count
    columns = {
        "sample_id": pa.array([example.sample_id for example in examples], type=pa.string()),
        "row_index": pa.array([example.row_index for example in examples], type=pa.int64()),
        "generation_index": pa.array([example.generation_index for example in examples], type=pa.int32()),
        "completion_text": pa.array(texts, type=pa.string()),
        "student_prompt_ids": _ids_column(student_prompt, student_prompt_starts),
        "student_completion_ids": _ids_column(student_ids, student_starts),
        "teacher_prompt_ids": _ids_column(teacher_prompt, teacher_prompt_starts),
        "teacher_completion_ids": _ids_column(teacher_ids, teacher_starts),
        "student_group_ids": _ids_column(student_groups, student_starts),
        "teacher_group_ids": _ids_column(teacher_groups, teacher_starts),
        "num_groups": pa.array(num_groups.astype(np.int32), type=pa.int32()),
        "status": pa.array(status, type=pa.string()),
        "truncated": pa.array(np.zeros(count, dtype=bool), type=pa.bool_()),
        "excluded_student_tokens": pa.array(excluded_student.astype(np.int32), type=pa.int32()),
        "excluded_teacher_tokens": pa.array(excluded_teacher.astype(np.int32), type=pa.int32()),
        "finish_reason": pa.array(nothing, type=pa.string()),
    }
    for field in ALIGNED_SCHEMA:
        if field.name not in columns:  # the teacher-cache columns: null
            columns[field.name] = _list_column(nothing, field.type)
    return pa.Table.from_arrays([columns[field.name] for field in ALIGNED_SCHEMA], schema=ALIGNED_SCHEMA)


# --------------------------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(student_spec: TokenizerSpec, teacher_spec: TokenizerSpec, cfg: AlignConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(student=load_side(student_spec), teacher=load_side(teacher_spec), cfg=cfg,
                   writer=ShardWriter(cfg.out, kind="aligned"))


def _worker_shard(index: int, span: tuple[int, int], items: list[Example | InvalidRow]) -> dict[str, Any]:
    table, stats = process_shard(items, _WORKER["student"], _WORKER["teacher"], _WORKER["cfg"], threads=1)
    record = _WORKER["writer"].write_shard(index, table, stats=stats, source_rows=span)
    _test_delay()
    return record


def _test_delay() -> None:
    delay = float(os.environ.get(_SHARD_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------


def _chunks(items: Iterator[Example | InvalidRow], size: int) -> Iterator[tuple[int, list[Example | InvalidRow]]]:
    """(shard index, items) with shard k = source rows [k*size, (k+1)*size)."""
    chunk: list[Example | InvalidRow] = []
    index = 0
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield index, chunk
            chunk, index = [], index + 1
    if chunk:
        yield index, chunk


def _estimate_rows(cfg: AlignConfig) -> int | None:
    """Row count for the progress bar when it is cheap to know (teacher cache, parquet, small jsonl)."""
    source = Path(cfg.source)
    try:
        if cfg.teacher_cache is not None:
            return int(read_manifest(cfg.teacher_cache, kind="teacher")["num_rows"])
        if source.suffix == ".parquet" and source.is_file():
            import pyarrow.parquet as pq

            return pq.ParquetFile(source).metadata.num_rows
        if source.suffix == ".jsonl" and source.is_file() and source.stat().st_size < (256 << 20):
            with open(source, "rb") as handle:
                return sum(1 for line in handle if line.strip())
    except Exception:  # an estimate only; the reader reports real problems
        return None
    return None


def _derived_stats(stats: dict[str, Any]) -> dict[str, Any]:
    groups = max(stats.get("groups", 0), 1)
    derived = {}
    for side in ("student", "teacher"):
        part = stats.get(side, {})
        derived[f"{side}_multi_token_group_share"] = part.get("multi_token_groups", 0) / groups
        derived[f"{side}_tokens_per_group"] = part.get("grouped_tokens", 0) / groups
    derived["rows_with_mismatch"] = sum(v for k, v in stats.get("rows_by_status", {}).items() if k != "ok")
    return {"derived": derived}


def _resolve_teacher(cfg: AlignConfig) -> tuple[TokenizerSpec, dict[str, Any] | None]:
    """The teacher tokenizer to load, and the teacher cache's manifest when the rows come from one.

    With a cache, the tokenizer defaults to the one it names, loaded with the chat template file its config
    names (the fingerprint covers the template; the prompt ids themselves are taken from the cache)."""
    if cfg.teacher_cache is None:
        spec = TokenizerSpec(cfg.teacher_tokenizer, cfg.teacher_tokenizer_revision,  # type: ignore[arg-type]
                             _read_template(cfg.teacher_chat_template))
        return spec, None
    manifest = read_manifest(cfg.teacher_cache, kind="teacher")
    recorded = (manifest.get("fingerprints") or {}).get("teacher_tokenizer") or {}
    name = cfg.teacher_tokenizer or recorded.get("name")
    if not name:
        raise GoldInputError(f"The teacher cache {cfg.teacher_cache} does not name its teacher tokenizer: pass "
                             f"--teacher-tokenizer.")
    template_file = (manifest.get("config") or {}).get("chat_template")
    template = _read_template(template_file) if template_file and Path(template_file).is_file() else None
    return TokenizerSpec(name, cfg.teacher_tokenizer_revision or recorded.get("revision"), template), manifest


def _read_template(path: str | None) -> str | None:
    return Path(path).read_text(encoding="utf-8") if path is not None else None


def run_align(cfg: AlignConfig) -> dict[str, Any]:
    """Align `cfg.source` into `cfg.out` (shards, vocab_map/vocab_map.parquet, manifest.json last).

    Returns the manifest's stats. Raises GoldInputError subclasses (with a sentence saying what to do) for bad
    input, an existing output without resume/overwrite, or a teacher cache made with another tokenizer.
    """
    from gold_pipeline.progress import RateProgress
    from gold_pipeline.vocab_map import cached_vocab_map

    started = time.perf_counter()
    teacher_spec, cache_manifest = _resolve_teacher(cfg)
    student_spec = TokenizerSpec(cfg.student_tokenizer, cfg.student_tokenizer_revision,
                                 _read_template(cfg.student_chat_template))
    student, teacher = load_side(student_spec), load_side(teacher_spec)
    fingerprints = {
        "dataset": dataset_fingerprint(cfg.source, split=cfg.split, config_name=cfg.dataset_config),
        "student_tokenizer": tokenizer_record(student_spec, student, cfg.student_chat_template),
        "teacher_tokenizer": tokenizer_record(teacher_spec, teacher, cfg.teacher_chat_template),
    }
    if cache_manifest is not None:
        check_fingerprint(cache_manifest, "teacher_tokenizer", fingerprints["teacher_tokenizer"]["sha256"],
                          name=teacher_spec.name)
        fingerprints["teacher_model"] = (cache_manifest.get("fingerprints") or {}).get("teacher_model")

    config = dataclasses.asdict(cfg) | {"teacher_tokenizer": teacher_spec.name,
                                        "teacher_tokenizer_revision": teacher_spec.revision}
    runtime_only = ("out", "resume", "overwrite", "num_workers", "progress")
    identity = {"config": {k: v for k, v in config.items() if k not in runtime_only}, "fingerprints": fingerprints}
    out = prepare_output_dir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
    check_run_identity(out, identity, resume=cfg.resume)
    writer = ShardWriter(out, kind="aligned")

    vocab_path = out / VOCAB_MAP_FILE
    pairs = np.asarray(cached_vocab_map(student.table, teacher.table)).reshape(-1, 2).astype(np.int32)  # (M, 2)
    vocab_table = pa.Table.from_arrays([pa.array(pairs[:, 0]), pa.array(pairs[:, 1])], schema=VOCAB_MAP_SCHEMA)
    vocab_record = write_table_atomic(vocab_path, vocab_table)

    items = iter_parsed(cfg.source, split=cfg.split, config_name=cfg.dataset_config)
    num_shards = 0
    processing_started = time.perf_counter()
    disable = None if cfg.progress is None else not cfg.progress
    with RateProgress("align", total=_estimate_rows(cfg), disable=disable) as bar:
        if cfg.num_workers == 1:
            for index, chunk in _chunks(items, cfg.shard_size):
                num_shards = index + 1
                if writer.is_done(index):
                    bar.advance(rows=len(chunk))
                    continue
                table, stats = process_shard(chunk, student, teacher, cfg,
                                             progress=lambda r, t: bar.advance(rows=r, tokens=t))
                skipped = len(chunk) - table.num_rows
                bar.advance(rows=skipped)
                writer.write_shard(index, table, stats=stats, source_rows=(chunk[0].row_index,
                                                                           chunk[-1].row_index + 1))
                _test_delay()
        else:
            num_shards = _run_parallel(cfg, items, writer, student_spec, teacher_spec, bar)
    if num_shards == 0:
        raise GoldInputError(f"Dataset {cfg.source} has no rows: nothing to align.")

    records = writer.records()
    total = merge_stats(*(record["stats"] for record in records))
    elapsed = time.perf_counter() - started
    processing = time.perf_counter() - processing_started
    extra_stats = _derived_stats(total) | {
        "vocab_map": {"pairs": vocab_record["rows"],
                      "student_share": vocab_record["rows"] / max(fingerprints["student_tokenizer"]["vocab_size"], 1),
                      "teacher_share": vocab_record["rows"] / max(fingerprints["teacher_tokenizer"]["vocab_size"], 1)},
        # this invocation only (a resumed run counts the shards it wrote): wall time incl. tokenizer loading,
        # and completion tokens (both sides) per second of the shard loop
        "last_run": {"seconds": round(elapsed, 3), "resumed": cfg.resume,
                     "completion_tokens": bar.tokens,
                     "completion_tokens_per_s": round(bar.tokens / max(processing, 1e-9), 1)},
    }
    files = {"vocab_map": VOCAB_MAP_FILE, "vocab_map_sha256": vocab_record["sha256"]}
    config["overlong_policy"] = (
        "none (no max_length)" if cfg.max_length is None else
        f"{cfg.overlong}: rows over {cfg.max_length} prompt+completion tokens on either side are "
        + ("cut at the last common group boundary that fits (no end-of-turn ids)" if cfg.overlong == "truncate"
           else "skipped") + "; skips counted in stats.skipped.too_long")
    writer.write_manifest(config=config, fingerprints=fingerprints, stats=extra_stats, files=files,
                          expected_shards=num_shards)
    return read_manifest(out, kind="aligned")["stats"]


def _run_parallel(cfg, items, writer, student_spec, teacher_spec, bar) -> int:
    """Shards on a process pool (each worker has the tokenizers loaded once); at most 2 shards queued per worker
    so a huge streaming dataset is never held in memory."""
    num_shards = 0
    pending: dict[Any, int] = {}

    def collect(done) -> None:
        for future in done:
            size = pending.pop(future)
            record = future.result()
            stats = record["stats"]
            tokens = stats.get("student", {}).get("completion_tokens", 0) + stats.get("teacher", {}).get(
                "completion_tokens", 0)
            bar.advance(rows=size, tokens=tokens)

    # fork (Linux): workers inherit the tokenizers this process already loaded (load_side is cached), so they
    # start in milliseconds; elsewhere spawn, and each worker loads them once in its initializer.
    method = "fork" if sys.platform == "linux" else "spawn"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the Rust thread pool must not be live across a fork
    with ProcessPoolExecutor(max_workers=cfg.num_workers, mp_context=get_context(method),
                             initializer=_init_worker, initargs=(student_spec, teacher_spec, cfg)) as pool:
        for index, chunk in _chunks(items, cfg.shard_size):
            num_shards = index + 1
            if writer.is_done(index):
                bar.advance(rows=len(chunk))
                continue
            if not cfg.skip_invalid:
                for item in chunk:
                    if isinstance(item, InvalidRow):
                        raise InvalidRowError(item)
            span = (chunk[0].row_index, chunk[-1].row_index + 1)
            pending[pool.submit(_worker_shard, index, span, chunk)] = len(chunk)
            if len(pending) >= 2 * cfg.num_workers:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                collect(done)
        done, _ = wait(list(pending))
        collect(done)
    return num_shards

