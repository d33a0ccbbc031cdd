"""Byte-exact alignment of two tokenizations of the same completion (DESIGN.md §2).

Group boundaries are the byte positions where both token sequences end a token. A group is the run of student
tokens and the run of teacher tokens between two consecutive common boundaries: groups partition both
completions in order and the bytes of both sides of a group are equal. The merge of the two cumulative-length
arrays is vectorized (cumsum + searchsorted), O(n + m) work with no per-token Python loop.

Excluded tokens get group id -1: special tokens (no bytes), and every token past the first byte where the
student bytes, the teacher bytes and (if given) the text disagree, or past the longest valid UTF-8 prefix. A
mismatched tail is never merged into one big group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gold_pipeline.byte_tables import ByteTable, decode_bytes_array

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


def valid_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that is valid UTF-8 ending on a character boundary."""
    try:
        data.decode("utf-8")
        return len(data)
    except UnicodeDecodeError as error:
        return error.start


def _side(table: ByteTable, ids, strip: bool) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(lengths (n,) int32, ends (n,) int64, bytes) of one side, the dummy-prefix space removed when `strip`.

    The bytes are gathered from the table's flat buffer with one vectorized index (no per-token loop).
    """
    ids = np.asarray(ids, dtype=np.int64)  # (n,)
    lengths = table.lengths[ids]  # (n,) int32
    if ids.size == 0:
        return lengths, np.zeros(0, dtype=np.int64), b""
    ends = np.cumsum(lengths, dtype=np.int64)  # (n,)
    total = int(ends[-1])
    source = np.repeat(table.offsets[ids] - (ends - lengths), lengths)  # (bytes,) start shift per output byte
    source += np.arange(total, dtype=np.int64)
    data = table.flat[source].tobytes()
    if strip and data[:1] == b" ":  # the first token with bytes starts with the dummy-prefix space
        first = int(np.argmax(lengths > 0))
        lengths = lengths.copy()
        lengths[first] -= 1
        ends = ends - 1
        ends[:first] += 1
        data = data[1:]
    return lengths, ends, data


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

    student_strip = _strip_flag(student_table, text_starts_with_space)
    teacher_strip = _strip_flag(teacher_table, text_starts_with_space)
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


def _strip_flag(table: ByteTable, text_starts_with_space: bool | None) -> bool:
    """Whether the first byte-carrying token's leading space is the tokenizer's dummy prefix."""
    if not table.dummy_prefix:
        return False
    if table.dummy_prefix_conditional and text_starts_with_space:
        return False  # the tokenizer only adds the prefix when the text does not start with a space
    return True


def completion_text_from_ids(table: ByteTable, ids) -> tuple[str, int]:
    """(text, n_valid_bytes): the longest valid-UTF-8 prefix of a sampled completion's bytes, as text.

    For on-policy rollouts: the student samples ids that may end inside a multi-byte character; the teacher
    side is tokenized from this text, and align_completion(..., text=text) then excludes the student's tail.
    """
    data = decode_bytes_array(table, ids).tobytes()
    valid = valid_utf8_prefix(data)
    return data[:valid].decode("utf-8"), valid


def _concat_ids(rows) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,) int64 of all rows, row_starts (R+1,) int64)."""
    arrays = [np.asarray(r, dtype=np.int64) for r in rows]
    counts = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    starts = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return flat, starts


def _row_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(R,) sum of values over each row [starts[r], starts[r+1]) (empty rows give 0)."""
    cumulative = np.zeros(values.size + 1, dtype=np.int64)
    np.cumsum(values, out=cumulative[1:])
    return cumulative[starts[1:]] - cumulative[starts[:-1]]


def _gather(table: ByteTable, ids: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenated bytes of ids (N,) with one vectorized gather."""
    if ids.size == 0:
        return b""
    ends = np.cumsum(lengths, dtype=np.int64)
    source = np.repeat(table.offsets[ids] - (ends - lengths), lengths)
    source += np.arange(int(ends[-1]), dtype=np.int64)
    return table.flat[source].tobytes()


def align_batch(
    student_rows,
    teacher_rows,
    student_table: ByteTable,
    teacher_table: ByteTable,
    texts=None,
) -> list[Alignment]:
    """align_completion for many completions at once; the same results, vectorized across rows.

    student_rows / teacher_rows: sequences of (n_r,) / (m_r,) id arrays or lists; texts: None or one str/bytes
    per row. Rows whose tables use a dummy prefix, whose bytes disagree or whose text is not plain valid UTF-8
    are handed to align_completion one by one; the rest are merged in one pass over the concatenated arrays.
    """
    count = len(student_rows)
    if len(teacher_rows) != count or (texts is not None and len(texts) != count):
        raise ValueError(
            f"align_batch got {count} student rows, {len(teacher_rows)} teacher rows and "
            f"{'no' if texts is None else len(texts)} texts: pass one of each per completion."
        )
    if count == 0:
        return []
    if student_table.dummy_prefix or teacher_table.dummy_prefix:
        texts_ = texts if texts is not None else [None] * count
        return [align_completion(s, t, student_table, teacher_table, x)
                for s, t, x in zip(student_rows, teacher_rows, texts_)]  # fmt: skip

    student_ids, student_starts = _concat_ids(student_rows)  # (N,), (R+1,)
    teacher_ids, teacher_starts = _concat_ids(teacher_rows)  # (M,), (R+1,)
    student_lengths = student_table.lengths[student_ids]  # (N,) int32
    teacher_lengths = teacher_table.lengths[teacher_ids]  # (M,)
    student_totals = _row_sums(student_lengths, student_starts)  # (R,) bytes per row
    teacher_totals = _row_sums(teacher_lengths, teacher_starts)
    student_bytes = _gather(student_table, student_ids, student_lengths)
    teacher_bytes = _gather(teacher_table, teacher_ids, teacher_lengths)
    byte_starts = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(student_totals, out=byte_starts[1:])

    # rows where both sides (and the text) spell the same valid UTF-8 bytes take the fast path
    fast = student_totals == teacher_totals  # (R,)
    if texts is not None:
        encoded = []
        for text in texts:
            try:
                encoded.append(text.encode("utf-8") if isinstance(text, str) else None)
            except UnicodeEncodeError:
                encoded.append(None)
        fast &= np.fromiter((e is not None for e in encoded), dtype=bool, count=count)
    if student_bytes != teacher_bytes or texts is not None:
        s_view, t_view = memoryview(student_bytes), memoryview(teacher_bytes)
        t_byte_starts = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(teacher_totals, out=t_byte_starts[1:])
        bs, ts = byte_starts.tolist(), t_byte_starts.tolist()
        for r in np.flatnonzero(fast).tolist():
            row = s_view[bs[r] : bs[r + 1]]
            if row != t_view[ts[r] : ts[r + 1]] or (texts is not None and row != encoded[r]):
                fast[r] = False
    if texts is None:  # no text: each fast row must itself be valid UTF-8
        bs = byte_starts.tolist()
        for r in np.flatnonzero(fast).tolist():
            if valid_utf8_prefix(student_bytes[bs[r] : bs[r + 1]]) != bs[r + 1] - bs[r]:
                fast[r] = False

    # one global merge: row r's byte positions are shifted by base[r] so rows never share a boundary
    base = np.zeros(count, dtype=np.int64)
    np.cumsum(np.maximum(student_totals, teacher_totals)[:-1] + 1, out=base[1:])
    student_ends = np.cumsum(student_lengths, dtype=np.int64)  # (N,) global running byte count
    student_ends += np.repeat(base - (byte_starts[:-1]), np.diff(student_starts))
    teacher_ends = np.cumsum(teacher_lengths, dtype=np.int64)  # (M,)
    teacher_byte_starts = np.zeros(count, dtype=np.int64)
    np.cumsum(teacher_totals[:-1], out=teacher_byte_starts[1:])
    teacher_ends += np.repeat(base - teacher_byte_starts, np.diff(teacher_starts))
    results: list[Alignment | None] = [None] * count
    if teacher_ends.size and student_ends.size:
        position = np.searchsorted(teacher_ends, student_ends)
        np.minimum(position, teacher_ends.size - 1, out=position)
        student_closes = teacher_ends[position] == student_ends
        student_closes &= student_lengths > 0
    else:
        position = np.zeros(student_ends.size, dtype=np.int64)
        student_closes = np.zeros(student_ends.size, dtype=bool)
    teacher_closes = np.zeros(teacher_ends.size, dtype=bool)
    teacher_closes[position[student_closes]] = True
    groups_per_row = _row_sums(student_closes, student_starts)  # (R,)
    student_group_ids = _row_group_ids(student_closes, student_lengths, student_starts, groups_per_row)
    teacher_group_ids = _row_group_ids(teacher_closes, teacher_lengths, teacher_starts, groups_per_row)

    ss, ts_, ng = student_starts.tolist(), teacher_starts.tolist(), groups_per_row.tolist()
    totals = student_totals.tolist()
    texts_ = texts if texts is not None else [None] * count
    for r in range(count):
        if not fast[r]:
            results[r] = align_completion(student_rows[r], teacher_rows[r], student_table, teacher_table, texts_[r])
            continue
        results[r] = Alignment(
            student_group_ids=student_group_ids[ss[r] : ss[r + 1]],
            teacher_group_ids=teacher_group_ids[ts_[r] : ts_[r + 1]],
            num_groups=ng[r],
            status=STATUS_OK,
            excluded_student_tokens=0,
            excluded_teacher_tokens=0,
            matched_bytes=totals[r] if ng[r] else 0,
            total_bytes=totals[r],
        )
    return results  # type: ignore[return-value]


def _row_group_ids(closes: np.ndarray, lengths: np.ndarray, starts: np.ndarray, groups_per_row: np.ndarray):
    """(N,) int32 group ids numbered from 0 in each row; -1 for 0-byte tokens and tokens after the row's last
    common boundary."""
    group_ids = np.cumsum(closes, dtype=np.int32)  # (N,) global
    group_ids -= closes
    row_counts = np.diff(starts)
    closed_before_row = np.zeros(starts.size - 1, dtype=np.int32)
    np.cumsum(groups_per_row[:-1], out=closed_before_row[1:])
    group_ids -= np.repeat(closed_before_row, row_counts)
    group_ids[(lengths <= 0) | (group_ids >= np.repeat(groups_per_row, row_counts))] = -1
    return group_ids
