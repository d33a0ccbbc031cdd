"""Byte-exact alignment of two tokenizations of the same completion (DESIGN.md §2).

Group boundaries are the byte positions where both token sequences end a token. A group is the run of student
tokens and the run of teacher tokens between two consecutive common boundaries: groups partition both
completions in order and the bytes of both sides of a group are equal. The merge of the two cumulative-length
arrays is vectorized (cumsum + searchsorted), O(n + m) work with no per-token Python loop. Many completions at
once: `gold_pipeline.align.batch`.

Excluded tokens get group id -1: special tokens (no bytes), and every token past the first byte where the
student bytes, the teacher bytes and (if given) the text disagree, or past the longest valid UTF-8 prefix. A
mismatched tail is never merged into one big group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gold_pipeline.text.bytes import (
    ByteTable,
    decode_bytes_array,
    gather_bytes,
    strips_dummy_prefix,
    token_spans,
    valid_utf8_prefix,
)

STATUS_OK = "ok"
STATUS_MISMATCH = "mismatch"  # the two tokenizations (or one and the text) spell different bytes
STATUS_INVALID_UTF8_TAIL = "invalid_utf8_tail"  # both agree, but the bytes end with incomplete/invalid UTF-8


@dataclass(frozen=True, eq=False)
class Alignment:
    student_group_ids: np.ndarray  # (n,) int32: 0,0,1,2,2,... ; -1 = excluded (specials, unmatched tail)
    teacher_group_ids: np.ndarray  # (m,) int32, same numbering
    num_groups: int
    status: str  # "ok" | "mismatch" | "invalid_utf8_tail"
    excluded_student_tokens: int  # non-special tokens (bytes > 0) excluded
    excluded_teacher_tokens: int
    # additions beyond the contract:
    matched_bytes: int = 0  # bytes covered by the groups
    total_bytes: int = 0  # max(student bytes, teacher bytes, text bytes)


def align_lengths(
    student_lengths: np.ndarray, teacher_lengths: np.ndarray, valid_bytes: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Group ids from the byte length of each token of both sides.

    student_lengths: (n,) ints; teacher_lengths: (m,) ints. valid_bytes: only the first `valid_bytes` bytes are
    trusted (boundaries past it are ignored). Returns (student_group_ids (n,) int32, teacher_group_ids (m,)
    int32, num_groups). 0-length tokens and tokens after the last trusted common boundary get -1.
    """
    student_lengths = np.asarray(student_lengths)
    teacher_lengths = np.asarray(teacher_lengths)
    student_group_ids, teacher_group_ids, boundaries = _align(student_lengths, teacher_lengths, valid_bytes)
    return student_group_ids, teacher_group_ids, int(boundaries.size)


def _align(student_lengths: np.ndarray, teacher_lengths: np.ndarray, valid_bytes: int | None):
    student_ends = np.cumsum(student_lengths, dtype=np.int64)  # (n,) byte offset where each token ends
    teacher_ends = np.cumsum(teacher_lengths, dtype=np.int64)  # (m,)
    return _merge(student_lengths, student_ends, teacher_lengths, teacher_ends, valid_bytes)


def _merge(student_lengths, student_ends, teacher_lengths, teacher_ends, valid_bytes: int | None):
    """(student_group_ids (n,), teacher_group_ids (m,), boundaries (G,)): the vectorized merge of the two
    cumulative-length arrays."""
    if student_ends.size == 0 or teacher_ends.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return (np.full(student_ends.size, -1, dtype=np.int32), np.full(teacher_ends.size, -1, dtype=np.int32),
                empty)  # fmt: skip
    limit = min(int(student_ends[-1]), int(teacher_ends[-1]))
    if valid_bytes is not None:
        limit = min(limit, int(valid_bytes))
    # common boundaries: ends of real student tokens that are also teacher token ends, in (0, limit]
    position = np.searchsorted(teacher_ends, student_ends)  # (n,) leftmost teacher token ending at/after it
    np.minimum(position, teacher_ends.size - 1, out=position)
    student_closes = teacher_ends[position] == student_ends  # (n,) this student token closes a group
    student_closes &= student_lengths > 0
    student_closes &= student_ends <= limit
    teacher_closes = np.zeros(teacher_ends.size, dtype=bool)  # (m,)
    teacher_closes[position[student_closes]] = True  # the leftmost teacher token with that end has bytes
    boundaries = student_ends[student_closes]  # (G,) sorted, unique
    last = int(boundaries[-1]) if boundaries.size else 0
    return (
        _group_ids(student_closes, student_ends, student_lengths, last),
        _group_ids(teacher_closes, teacher_ends, teacher_lengths, last),
        boundaries,
    )


def _group_ids(closes: np.ndarray, ends: np.ndarray, lengths: np.ndarray, last: int) -> np.ndarray:
    """(n,) int32 group of each token = number of groups closed before it; -1 if excluded."""
    group_ids = np.cumsum(closes, dtype=np.int32)  # (n,)
    group_ids -= closes
    group_ids[(lengths <= 0) | (ends > last)] = -1
    return group_ids


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix of two byte strings."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    x = np.frombuffer(a, dtype=np.uint8, count=n)
    y = np.frombuffer(b, dtype=np.uint8, count=n)
    return int(np.argmax(x != y))


def _side(table: ByteTable, ids, strip: bool) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(lengths (n,) int32, ends (n,) int64, bytes) of one side, the dummy-prefix space removed when `strip`."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)  # (n,)
    lengths, offsets = token_spans(table, ids, np.array([0, ids.size], dtype=np.int64), np.array([strip]))
    ends = np.cumsum(lengths, dtype=np.int64)  # (n,)
    return lengths, ends, gather_bytes(table.flat, offsets, lengths).tobytes()


def align_completion(
    student_ids,
    teacher_ids,
    student_table: ByteTable,
    teacher_table: ByteTable,
    text: str | bytes | None = None,
) -> Alignment:
    """Align the student and teacher tokenizations of one completion by comparing their actual bytes.

    student_ids: (n,) ints; teacher_ids: (m,) ints; text: the completion text both were made from (optional; it
    lets a text-changing normalizer be detected even when both sides agree, and resolves a conditional dummy
    prefix). Special tokens get -1; tokens past the first byte mismatch or an invalid/incomplete UTF-8 tail
    get -1 and `status` says why.
    """
    text_bytes, text_valid = None, False
    if isinstance(text, str):
        try:
            text_bytes, text_valid = text.encode("utf-8"), True
        except UnicodeEncodeError:  # lone surrogates: compare what can be compared
            text_bytes = text.encode("utf-8", "surrogatepass")
    elif text is not None:
        text_bytes = bytes(text)
    text_starts_with_space = text_bytes[:1] == b" " if text_bytes is not None else None

    student_strip = strips_dummy_prefix(student_table, text_starts_with_space)
    teacher_strip = strips_dummy_prefix(teacher_table, text_starts_with_space)
    student_lengths, student_ends, student_bytes = _side(student_table, student_ids, student_strip)
    teacher_lengths, teacher_ends, teacher_bytes = _side(teacher_table, teacher_ids, teacher_strip)
    if student_bytes == teacher_bytes and (text_bytes is None or text_bytes == student_bytes):
        total = prefix = len(student_bytes)  # the common case: everything agrees
        valid = prefix if text_valid else valid_utf8_prefix(student_bytes)
    else:
        total = max(len(student_bytes), len(teacher_bytes), len(text_bytes) if text_bytes is not None else 0)
        prefix = _common_prefix(student_bytes, teacher_bytes)
        if text_bytes is not None:
            prefix = min(prefix, _common_prefix(student_bytes, text_bytes))
        valid = valid_utf8_prefix(student_bytes[:prefix])
    if prefix < total:
        status = STATUS_MISMATCH
        if valid == prefix and _only_invalid_tails(student_bytes, teacher_bytes, text_bytes, prefix):
            status = STATUS_INVALID_UTF8_TAIL  # e.g. a sampled completion cut inside a character
    else:
        status = STATUS_OK if valid == prefix else STATUS_INVALID_UTF8_TAIL

    student_group_ids, teacher_group_ids, boundaries = _merge(
        student_lengths, student_ends, teacher_lengths, teacher_ends, valid
    )
    return Alignment(
        student_group_ids=student_group_ids,
        teacher_group_ids=teacher_group_ids,
        num_groups=int(boundaries.size),
        status=status,
        excluded_student_tokens=int(np.count_nonzero((student_group_ids < 0) & (student_lengths > 0))),
        excluded_teacher_tokens=int(np.count_nonzero((teacher_group_ids < 0) & (teacher_lengths > 0))),
        matched_bytes=int(boundaries[-1]) if boundaries.size else 0,
        total_bytes=total,
    )


def _only_invalid_tails(student_bytes: bytes, teacher_bytes: bytes, text_bytes: bytes | None, prefix: int) -> bool:
    """True when every side past `prefix` is only bytes that are not valid UTF-8 (no real disagreement)."""
    for data in (student_bytes, teacher_bytes, text_bytes):
        if data is not None and len(data) > prefix and valid_utf8_prefix(data[prefix:]) > 0:
            return False
    return True


def completion_text_from_ids(table: ByteTable, ids) -> tuple[str, int]:
    """(text, n_valid_bytes): the longest valid-UTF-8 prefix of a sampled completion's bytes, as text.

    For on-policy rollouts: the student samples ids that may end inside a multi-byte character; the teacher
    side is tokenized from this text, and align_completion(..., text=text) then excludes the student's tail.
    """
    data = decode_bytes_array(table, ids).tobytes()
    valid = valid_utf8_prefix(data)
    return data[:valid].decode("utf-8"), valid
