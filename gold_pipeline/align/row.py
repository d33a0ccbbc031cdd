"""One aligned row, and the one rule for cutting an aligned completion short (DESIGN.md §2, §5).

`cut_at_group` is the single owner of truncation: a completion is only ever cut at a common group boundary that
is also a UTF-8 character boundary of its text, so both sides keep exactly the same bytes and the kept text
decodes. `gold align` (--max-length), training (`max_completion_length`) and on-policy rollouts all cut here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gold_pipeline.align.groups import Alignment, align_completion
from gold_pipeline.data.ragged import row_of, starts_of
from gold_pipeline.data.records import Example
from gold_pipeline.errors import GoldInputError
from gold_pipeline.text.bytes import ByteTable, completion_byte_lengths, strips_dummy_prefix
from gold_pipeline.text.encode import encode_completion, render_prompt_ids
from gold_pipeline.text.pair import TokenizerSide


class OverlongRow(Exception):
    """Raised by align_example when a row cannot be kept under max_length (counted as skipped.too_long)."""


def group_ends(group_ids: np.ndarray, num_groups: int) -> np.ndarray:
    """(G,) index one past the last token of each group. group_ids (n,) non-decreasing where >= 0."""
    positions = np.flatnonzero(group_ids >= 0)
    last = np.searchsorted(group_ids[positions], np.arange(num_groups), side="right") - 1  # (G,) into positions
    return positions[last] + 1


@dataclass(frozen=True)
class GroupCut:
    """Where to cut a completion: keep `groups` groups, the first `student_tokens` / `teacher_tokens` tokens
    and the first `text_bytes` bytes of the text."""

    groups: int
    student_tokens: int
    teacher_tokens: int
    text_bytes: int


def cut_at_group(student_groups: np.ndarray, teacher_groups: np.ndarray, num_groups: int,
                 student_byte_lengths: np.ndarray, text: bytes, student_budget: int,
                 teacher_budget: int) -> GroupCut:
    """The longest prefix of whole groups where both sides fit their token budgets and the cut falls on a UTF-8
    character boundary of `text` (two byte-level tokenizers can both split a character, so a group boundary can
    lie inside one).

    student_groups (n,) / teacher_groups (m,) int group ids (-1 = excluded); student_byte_lengths (n,) bytes of
    each student token (dummy-prefix space removed); text: the completion's bytes. groups == 0 when nothing fits.
    """
    if num_groups == 0:
        return GroupCut(0, 0, 0, 0)
    student_ends = group_ends(student_groups, num_groups)  # (G,)
    teacher_ends = group_ends(teacher_groups, num_groups)  # (G,)
    byte_ends = np.cumsum(student_byte_lengths, dtype=np.int64)[student_ends - 1]  # (G,) where each group ends
    padded = np.frombuffer(text + b"\x00", dtype=np.uint8)
    at_char_start = (padded[np.minimum(byte_ends, len(text))] & 0xC0) != 0x80  # (G,) next byte starts a character
    fits = (student_ends <= student_budget) & (teacher_ends <= teacher_budget) & at_char_start
    kept = np.flatnonzero(fits)
    if not kept.size:
        return GroupCut(0, 0, 0, 0)
    last = int(kept[-1])
    return GroupCut(last + 1, int(student_ends[last]), int(teacher_ends[last]), int(byte_ends[last]))


def student_byte_lengths(table: ByteTable, ids, text: str) -> np.ndarray:
    """(n,) bytes of each student completion token of `text` (the dummy-prefix rule decided by the text)."""
    return completion_byte_lengths(table, ids, strip_dummy_prefix=strips_dummy_prefix(table, text[:1] == " "))


@dataclass(frozen=True)
class Tokenized:
    """One side of one row already tokenized by the caller (batched per shard)."""

    prompt_ids: Any  # (p,) ints
    completion_ids: Any  # (n,) ints


def _side_ids(side: TokenizerSide, example: Example, given: Tokenized | None) -> tuple[np.ndarray, np.ndarray]:
    """(prompt (p,), completion (n,)) int32 ids of one side; tokenized here unless given."""
    if given is None:
        given = Tokenized(render_prompt_ids(side.tokenizer, example.prompt_messages),
                          encode_completion(side.tokenizer, example.completion_text))
    return np.asarray(given.prompt_ids, dtype=np.int32), np.asarray(given.completion_ids, dtype=np.int32)


def _cached_teacher(example: Example, teacher: TokenizerSide) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, completion text part, zero-byte tail) of a teacher-cache row's ids, checked against the vocab."""
    extra = example.extra
    cached_ids = np.asarray(extra["teacher_completion_ids"], dtype=np.int32)  # (m,) incl. trailing EOS
    vocab = len(teacher.table.lengths)
    if len(cached_ids) and (cached_ids.min() < 0 or cached_ids.max() >= vocab):
        raise GoldInputError(
            f"Teacher cache row {example.row_index}: completion ids outside the teacher vocabulary (size {vocab}); "
            f"the cache was made with another tokenizer. Pass the cache's teacher tokenizer."
        )
    # trailing special tokens (EOS / end of turn) have no bytes: align the text part, give them -1
    zero = teacher.table.lengths[cached_ids] == 0
    text_len = len(cached_ids) - int(np.argmin(zero[::-1])) if not zero.all() else 0
    return np.asarray(extra["teacher_prompt_ids"], dtype=np.int32), cached_ids[:text_len], cached_ids[text_len:]


def align_example(
    example: Example,
    student: TokenizerSide,
    teacher: TokenizerSide,
    max_length: int | None = None,
    *,
    overlong: str = "truncate",
    tokenized: tuple[Tokenized | None, Tokenized | None] = (None, None),
    alignment: Alignment | None = None,
) -> dict[str, Any]:
    """One aligned output row (numpy arrays for the list columns). Raises OverlongRow when it must be skipped.

    tokenized: (student, teacher) ids the caller already has (batched per shard); None tokenizes that side here.
    A teacher-cache row (`extra["teacher_completion_ids"]`) uses the cached teacher ids instead. alignment:
    align_completion of exactly these completion ids and text (from align.batch), for a row that is not from a
    teacher cache; None computes it."""
    text = example.completion_text
    if text is None:
        raise GoldInputError(f"Row {example.row_index}: it has no completion to align; give every row a completion "
                             f"(or run `gold teacher-cache` first to generate them).")
    student_prompt, student_completion = _side_ids(student, example, tokenized[0])
    extra = example.extra
    cached = "teacher_completion_ids" in extra
    if cached:
        teacher_prompt, teacher_completion, teacher_tail = _cached_teacher(example, teacher)
        finished = extra.get("finish_reason") != "length"
    else:
        teacher_prompt, teacher_completion = _side_ids(teacher, example, tokenized[1])
        teacher_tail, finished = teacher.eot_ids, True
    student_tail = student.eot_ids if finished else np.zeros(0, dtype=np.int32)

    if alignment is None or cached:
        alignment = align_completion(student_completion, teacher_completion, student.table, teacher.table, text=text)
    student_groups = np.asarray(alignment.student_group_ids, dtype=np.int32)  # (n,)
    teacher_groups = np.asarray(alignment.teacher_group_ids, dtype=np.int32)  # (m,)
    num_groups, status = int(alignment.num_groups), alignment.status
    excluded = (int(alignment.excluded_student_tokens), int(alignment.excluded_teacher_tokens))
    truncated = False
    teacher_cut = len(teacher_completion) + len(teacher_tail)  # teacher tokens kept (for the top-k columns)

    student_total = len(student_prompt) + len(student_completion) + len(student_tail)
    teacher_total = len(teacher_prompt) + teacher_cut
    if max_length is not None and (student_total > max_length or teacher_total > max_length):
        if overlong == "skip":
            raise OverlongRow(example.row_index)
        text_bytes = text.encode("utf-8")
        cut = cut_at_group(student_groups, teacher_groups, num_groups,
                           student_byte_lengths(student.table, student_completion, text), text_bytes,
                           max_length - len(student_prompt), max_length - len(teacher_prompt))
        if cut.groups == 0:
            raise OverlongRow(example.row_index)
        student_cut, teacher_cut = cut.student_tokens, cut.teacher_tokens
        student_completion, student_groups = student_completion[:student_cut], student_groups[:student_cut]
        teacher_completion, teacher_groups = teacher_completion[:teacher_cut], teacher_groups[:teacher_cut]
        text = text_bytes[: cut.text_bytes].decode("utf-8")
        num_groups, status, excluded, truncated = cut.groups, "ok", (0, 0), True
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


def global_group_ids(group_ids: np.ndarray, starts: np.ndarray, num_groups: np.ndarray) -> np.ndarray:
    """(N,) int64 group ids of R rows laid end to end, numbered across rows (row r's groups start after the
    groups of rows 0..r-1); -1 stays -1. group_ids (N,) per-row ids; starts (R+1,); num_groups (R,)."""
    offsets = starts_of(num_groups)[:-1]  # (R,) groups of the rows before
    group_ids = np.asarray(group_ids, dtype=np.int64)
    return np.where(group_ids >= 0, group_ids + offsets[row_of(starts)], -1)
