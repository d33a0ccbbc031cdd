"""Byte-exact alignment of two tokenizations of the same completion (DESIGN.md §2).

Group boundaries are the byte positions where both token sequences end a token. A group is the run of student
tokens and the run of teacher tokens between two consecutive common boundaries: groups partition both
completions in order and the bytes of both sides of a group are equal. The merge of the two cumulative-length
arrays is vectorized (cumsum + searchsorted), O(n + m) work with no per-token Python loop. Many completions
(align_batch / align_flat) are aligned together: each row's bytes get a slot of their own in one byte space,
boundaries are marked in a boolean array over it, and only rows whose bytes disagree go through
align_completion one by one.

Excluded tokens get group id -1: special tokens (no bytes), and every token past the first byte where the
student bytes, the teacher bytes and (if given) the text disagree, or past the longest valid UTF-8 prefix. A
mismatched tail is never merged into one big group.
"""

from __future__ import annotations

import itertools
import os
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


# --------------------------------------------------------------------------------------------------------------
# Many completions at once
# --------------------------------------------------------------------------------------------------------------

_THREAD_MIN_TOKENS = 65_536  # below this a batch is aligned on one thread (a thread costs more than it saves)
_MAX_THREADS = 4


@dataclass(frozen=True, eq=False)
class BatchAlignment:
    """align_completion of R completions, as flat arrays: row r's student tokens are
    [student_starts[r], student_starts[r+1]) of student_group_ids (the same for the teacher)."""

    student_group_ids: np.ndarray  # (N,) int32, numbered from 0 in each row; -1 = excluded
    teacher_group_ids: np.ndarray  # (M,) int32
    student_starts: np.ndarray  # (R+1,) int64
    teacher_starts: np.ndarray  # (R+1,) int64
    num_groups: np.ndarray  # (R,) int64
    status: list[str]  # (R,)
    excluded_student_tokens: np.ndarray  # (R,) int64
    excluded_teacher_tokens: np.ndarray  # (R,) int64
    matched_bytes: np.ndarray  # (R,) int64
    total_bytes: np.ndarray  # (R,) int64

    def __len__(self) -> int:
        return len(self.status)

    def rows(self) -> list[Alignment]:
        """One Alignment per row (its group ids are views into the flat arrays)."""
        ss, ts = self.student_starts.tolist(), self.teacher_starts.tolist()
        columns = zip(self.num_groups.tolist(), self.status, self.excluded_student_tokens.tolist(),
                      self.excluded_teacher_tokens.tolist(), self.matched_bytes.tolist(), self.total_bytes.tolist())
        return [
            Alignment(student_group_ids=self.student_group_ids[ss[r] : ss[r + 1]],
                      teacher_group_ids=self.teacher_group_ids[ts[r] : ts[r + 1]], num_groups=groups, status=status,
                      excluded_student_tokens=excluded_s, excluded_teacher_tokens=excluded_t, matched_bytes=matched,
                      total_bytes=total)
            for r, (groups, status, excluded_s, excluded_t, matched, total) in enumerate(columns)
        ]  # fmt: skip


def align_batch(
    student_rows,
    teacher_rows,
    student_table: ByteTable,
    teacher_table: ByteTable,
    texts=None,
    *,
    threads: int | None = None,
) -> list[Alignment]:
    """align_completion for many completions at once; the same results, vectorized across rows.

    student_rows / teacher_rows: sequences of (n_r,) / (m_r,) id arrays or lists; texts: None or one str/bytes
    (or None) per row. threads: see align_batch_arrays.
    """
    return align_batch_arrays(student_rows, teacher_rows, student_table, teacher_table, texts,
                              threads=threads).rows()  # fmt: skip


def align_batch_arrays(
    student_rows,
    teacher_rows,
    student_table: ByteTable,
    teacher_table: ByteTable,
    texts=None,
    *,
    threads: int | None = None,
) -> BatchAlignment:
    """align_batch as flat arrays (no per-row objects).

    Rows where both sides (and the text, when given) spell the same valid UTF-8 bytes are merged in one pass over
    the concatenated arrays (the dummy-prefix space removed per row as align_completion removes it); the others
    (mismatches, invalid UTF-8, texts that are not str) are handed to align_completion one by one. threads: numpy
    releases the GIL, so a big batch is split into up to that many contiguous parts aligned on threads; None =
    up to min(4, usable CPUs) for batches of 64k+ tokens, 1 = this thread only (e.g. inside worker processes).
    """
    count = len(student_rows)
    if len(teacher_rows) != count or (texts is not None and len(texts) != count):
        raise ValueError(
            f"align_batch got {count} student rows, {len(teacher_rows)} teacher rows and "
            f"{'no' if texts is None else len(texts)} texts: pass one of each per completion."
        )
    student_ids, student_starts = _concat_ids(student_rows)  # (N,), (R+1,)
    teacher_ids, teacher_starts = _concat_ids(teacher_rows)  # (M,), (R+1,)
    return align_flat(student_ids, student_starts, teacher_ids, teacher_starts, student_table, teacher_table, texts,
                      threads=threads)  # fmt: skip


def align_flat(
    student_ids: np.ndarray,
    student_starts: np.ndarray,
    teacher_ids: np.ndarray,
    teacher_starts: np.ndarray,
    student_table: ByteTable,
    teacher_table: ByteTable,
    texts=None,
    *,
    threads: int | None = None,
) -> BatchAlignment:
    """align_batch_arrays of rows given back to back: student_ids (N,) ints with row r at
    [student_starts[r], student_starts[r+1]) (student_starts (R+1,) from 0 to N); the same for the teacher."""
    student_ids = np.asarray(student_ids, dtype=np.int64)
    teacher_ids = np.asarray(teacher_ids, dtype=np.int64)
    student_starts = np.asarray(student_starts, dtype=np.int64)
    teacher_starts = np.asarray(teacher_starts, dtype=np.int64)
    count = student_starts.size - 1
    if (count < 0 or teacher_starts.size != count + 1 or (texts is not None and len(texts) != count)
            or student_starts[0] != 0 or student_starts[-1] != student_ids.size or teacher_starts[0] != 0
            or teacher_starts[-1] != teacher_ids.size):  # fmt: skip
        raise ValueError(
            f"align_flat got {student_ids.size} student ids with {student_starts.size} row starts, "
            f"{teacher_ids.size} teacher ids with {teacher_starts.size} row starts and "
            f"{'no' if texts is None else len(texts)} texts: pass R+1 starts from 0 to the id count per side, "
            f"and one text per row."
        )
    tables = (student_table, teacher_table)
    parts = _split_rows(student_starts, teacher_starts, _thread_count(threads, student_ids.size + teacher_ids.size))
    if len(parts) <= 1:
        return _align_part(student_ids, student_starts, teacher_ids, teacher_starts, *tables, texts)
    from concurrent.futures import ThreadPoolExecutor

    def run(part: tuple[int, int]) -> BatchAlignment:
        first, last = part
        s0, s1, t0, t1 = student_starts[first], student_starts[last], teacher_starts[first], teacher_starts[last]
        return _align_part(student_ids[s0:s1], student_starts[first : last + 1] - s0, teacher_ids[t0:t1],
                           teacher_starts[first : last + 1] - t0, *tables,
                           None if texts is None else texts[first:last])  # fmt: skip

    with ThreadPoolExecutor(max_workers=len(parts) - 1) as pool:
        others = [pool.submit(run, part) for part in parts[1:]]
        first = run(parts[0])  # this thread aligns the first part meanwhile
        return _concat_results([first, *(future.result() for future in others)])


def _thread_count(threads: int | None, tokens: int) -> int:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"align_batch threads must be at least 1, got {threads}.")
        return threads
    if tokens < _THREAD_MIN_TOKENS:
        return 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(_MAX_THREADS, usable, tokens // _THREAD_MIN_TOKENS))


def _split_rows(student_starts: np.ndarray, teacher_starts: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Up to `parts` contiguous, non-empty row ranges [first, last) with about equal token counts."""
    count = student_starts.size - 1
    parts = min(parts, count)
    if parts <= 1:
        return [(0, count)]
    tokens = student_starts + teacher_starts  # (R+1,) tokens before each row, both sides
    cuts = np.searchsorted(tokens, tokens[-1] * np.arange(1, parts) / parts)  # (parts-1,)
    bounds = np.unique(np.clip(np.concatenate([[0], cuts, [count]]), 0, count))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _concat_results(results: list[BatchAlignment]) -> BatchAlignment:
    def starts(name: str) -> np.ndarray:
        pieces, offset = [np.zeros(1, dtype=np.int64)], 0
        for result in results:
            pieces.append(getattr(result, name)[1:] + offset)
            offset += int(getattr(result, name)[-1])
        return np.concatenate(pieces)

    def join(name: str) -> np.ndarray:
        return np.concatenate([getattr(result, name) for result in results])

    return BatchAlignment(
        student_group_ids=join("student_group_ids"), teacher_group_ids=join("teacher_group_ids"),
        student_starts=starts("student_starts"), teacher_starts=starts("teacher_starts"),
        num_groups=join("num_groups"), status=[status for result in results for status in result.status],
        excluded_student_tokens=join("excluded_student_tokens"),
        excluded_teacher_tokens=join("excluded_teacher_tokens"), matched_bytes=join("matched_bytes"),
        total_bytes=join("total_bytes"),
    )  # fmt: skip


def _concat_ids(rows) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,) int64 of all rows, row_starts (R+1,) int64)."""
    counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    starts = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    if not len(rows):
        return np.zeros(0, dtype=np.int64), starts
    if all(isinstance(row, np.ndarray) for row in rows):
        return np.concatenate(rows).astype(np.int64, copy=False), starts
    if all(isinstance(row, list) for row in rows):
        return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(starts[-1])), starts
    return np.concatenate([np.asarray(row, dtype=np.int64).reshape(-1) for row in rows]), starts


def _row_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(R,) sum of values over each row [starts[r], starts[r+1]) (empty rows give 0)."""
    cumulative = np.zeros(values.size + 1, dtype=np.int64)
    np.cumsum(values, out=cumulative[1:])
    return cumulative[starts[1:]] - cumulative[starts[:-1]]


def _encode_text(text) -> bytes | None:
    """UTF-8 of a str text; None for anything else (bytes, None, lone surrogates: align_completion decides)."""
    if not isinstance(text, str):
        return None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _token_spans(table: ByteTable, ids: np.ndarray, starts: np.ndarray, strip_rows: np.ndarray | None):
    """(lengths (N,) int32, offsets (N,) int64 into table.flat) of each token; in the rows of `strip_rows` the
    first token with bytes loses its leading space when it has one (the dummy prefix, as in `_side`)."""
    lengths = np.take(table.lengths, ids)  # (N,) a copy
    offsets = np.take(table.offsets, ids)  # (N,)
    if strip_rows is not None and strip_rows.any():
        nonzero = np.flatnonzero(lengths)  # (K,)
        if nonzero.size:
            at = np.searchsorted(nonzero, starts[:-1])  # (R,) first token with bytes at or after the row start
            first = nonzero[np.minimum(at, nonzero.size - 1)]
            first = first[strip_rows & (at < nonzero.size) & (first < starts[1:])]
            first = first[table.flat[offsets[first]] == 0x20]
            lengths[first] -= 1
            offsets[first] += 1
    return lengths, offsets


def _gather_spans(flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenated flat[offsets[i] : offsets[i] + lengths[i]] of all tokens, with one vectorized gather."""
    total = int(lengths.sum(dtype=np.int64))
    if total == 0:
        return b""
    index = np.int32 if max(total, flat.size) < 2**31 else np.int64  # half the memory traffic of int64
    if not lengths.all():
        real = np.flatnonzero(lengths)  # (K,) tokens with bytes
        lengths, offsets = lengths[real], offsets[real]
    lengths, offsets = lengths.astype(index), offsets.astype(index)  # (K,)
    # source index of each output byte: +1 from one byte to the next, a jump at each token's first byte
    step = np.ones(total, dtype=index)  # (bytes,)
    jump = offsets.copy()  # (K,) from the previous token's last byte to this token's first
    jump[1:] -= offsets[:-1] + lengths[:-1] - 1
    step[np.cumsum(lengths) - lengths] = jump
    return np.take(flat, np.cumsum(step, out=step)).tobytes()


def _valid_rows(data: bytes, byte_starts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(R,) bool: which rows' bytes data[byte_starts[r] : byte_starts[r+1]] are valid UTF-8 (only `rows` are
    checked; the others are returned False)."""
    valid = np.zeros(byte_starts.size - 1, dtype=bool)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:  # check row by row
        bs = byte_starts.tolist()
        for r in np.flatnonzero(rows).tolist():
            valid[r] = valid_utf8_prefix(data[bs[r] : bs[r + 1]]) == bs[r + 1] - bs[r]
        return valid
    # all of it is valid UTF-8: a non-empty row is valid iff it starts and ends on a character boundary
    padded = np.frombuffer(data + b"\x00", dtype=np.uint8)
    boundary = (padded[byte_starts] & 0xC0) != 0x80  # (R+1,) not a continuation byte (the end counts as one)
    empty = byte_starts[1:] == byte_starts[:-1]
    valid[:] = rows & (empty | (boundary[:-1] & boundary[1:]))
    return valid


def _global_ends(lengths: np.ndarray, starts: np.ndarray, totals: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """(N,) int64 end of each token in a byte space where row r occupies its own slot of slots[r] bytes (its
    totals[r] bytes, then a gap), so tokens of different rows never share an end."""
    work = lengths.astype(np.int64)  # (N,)
    gap = np.zeros(totals.size, dtype=np.int64)  # (R,) added at each row's first token: the previous row's gap
    gap[1:] = (slots - totals)[:-1]
    first = starts[:-1]
    inside = first < work.size
    np.add.at(work, first[inside], gap[inside])  # an empty row's gap carries over to the next row's first token
    return np.cumsum(work, out=work)


def _align_part(student_ids, student_starts, teacher_ids, teacher_starts, student_table: ByteTable,
                teacher_table: ByteTable, texts) -> BatchAlignment:
    """align_batch_arrays of rows given as flat ids + row starts, on this thread."""
    count = student_starts.size - 1
    encoded = starts_with_space = None
    if texts is not None:
        encoded = [_encode_text(text) for text in texts]
        starts_with_space = np.fromiter((e is not None and e[:1] == b" " for e in encoded), dtype=bool, count=count)
    student_lengths, student_offsets = _token_spans(student_table, student_ids, student_starts,
                                                    _strip_rows(student_table, starts_with_space, count))
    teacher_lengths, teacher_offsets = _token_spans(teacher_table, teacher_ids, teacher_starts,
                                                    _strip_rows(teacher_table, starts_with_space, count))
    student_totals = _row_sums(student_lengths, student_starts)  # (R,) bytes per row
    teacher_totals = _row_sums(teacher_lengths, teacher_starts)
    student_bytes = _gather_spans(student_table.flat, student_offsets, student_lengths)
    teacher_bytes = _gather_spans(teacher_table.flat, teacher_offsets, teacher_lengths)
    byte_starts = np.zeros(count + 1, dtype=np.int64)  # (R+1,) of each row in student_bytes
    np.cumsum(student_totals, out=byte_starts[1:])

    # rows where both sides (and the text) spell the same valid UTF-8 bytes take the fast path
    fast = student_totals == teacher_totals  # (R,)
    if encoded is not None:
        text_lengths = np.fromiter((-1 if e is None else len(e) for e in encoded), dtype=np.int64, count=count)
        fast &= text_lengths == student_totals  # (unencodable texts have length -1)
    same = bool(fast.all()) and student_bytes == teacher_bytes
    if same and encoded is not None:
        same = b"".join(encoded) == student_bytes  # type: ignore[arg-type]  # (all encoded: fast.all())
    if not same:  # compare row by row
        s_view, t_view = memoryview(student_bytes), memoryview(teacher_bytes)
        teacher_byte_starts = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(teacher_totals, out=teacher_byte_starts[1:])
        bs, ts = byte_starts.tolist(), teacher_byte_starts.tolist()
        for r in np.flatnonzero(fast).tolist():
            row = s_view[bs[r] : bs[r + 1]]
            if row != t_view[ts[r] : ts[r + 1]] or (encoded is not None and row != encoded[r]):
                fast[r] = False
    if encoded is None:  # no text: each fast row must itself be valid UTF-8 (a str text always is)
        fast &= _valid_rows(student_bytes, byte_starts, fast)

    # one global merge: row r's bytes sit in a slot of its own, so rows never share a boundary
    slots = np.maximum(student_totals, teacher_totals) + 1  # (R,)
    student_ends = _global_ends(student_lengths, student_starts, student_totals, slots)  # (N,)
    teacher_ends = _global_ends(teacher_lengths, teacher_starts, teacher_totals, slots)  # (M,)
    marks = np.zeros(int(slots.sum()), dtype=bool)  # (bytes + R,) where a teacher token ends
    marks[teacher_ends] = True
    student_closes = marks[student_ends]  # (N,) this student token ends where a teacher token ends
    student_closes &= student_lengths > 0
    marks[:] = False
    marks[student_ends[student_closes]] = True  # the common boundaries
    teacher_closes = marks[teacher_ends]  # (M,) the teacher token with bytes that ends on a boundary
    teacher_closes &= teacher_lengths > 0
    groups_per_row = _row_sums(student_closes, student_starts)  # (R,)
    student_group_ids = _row_group_ids(student_closes, student_lengths, student_starts, groups_per_row)
    teacher_group_ids = _row_group_ids(teacher_closes, teacher_lengths, teacher_starts, groups_per_row)

    status = [STATUS_OK] * count
    excluded_student = np.zeros(count, dtype=np.int64)
    excluded_teacher = np.zeros(count, dtype=np.int64)
    matched = np.where(groups_per_row > 0, student_totals, 0)
    totals = student_totals.copy()
    ss, ts_ = student_starts.tolist(), teacher_starts.tolist()
    for r in np.flatnonzero(~fast).tolist():
        alignment = align_completion(student_ids[ss[r] : ss[r + 1]], teacher_ids[ts_[r] : ts_[r + 1]],
                                     student_table, teacher_table, None if texts is None else texts[r])
        student_group_ids[ss[r] : ss[r + 1]] = alignment.student_group_ids
        teacher_group_ids[ts_[r] : ts_[r + 1]] = alignment.teacher_group_ids
        groups_per_row[r] = alignment.num_groups
        status[r] = alignment.status
        excluded_student[r] = alignment.excluded_student_tokens
        excluded_teacher[r] = alignment.excluded_teacher_tokens
        matched[r], totals[r] = alignment.matched_bytes, alignment.total_bytes
    return BatchAlignment(
        student_group_ids=student_group_ids, teacher_group_ids=teacher_group_ids, student_starts=student_starts,
        teacher_starts=teacher_starts, num_groups=groups_per_row, status=status,
        excluded_student_tokens=excluded_student, excluded_teacher_tokens=excluded_teacher, matched_bytes=matched,
        total_bytes=totals,
    )  # fmt: skip


def _strip_rows(table: ByteTable, starts_with_space: np.ndarray | None, count: int) -> np.ndarray | None:
    """(R,) bool: rows whose first token's leading space is the dummy prefix (_strip_flag per row); None when
    the table has no dummy prefix."""
    if not table.dummy_prefix:
        return None
    rows = np.ones(count, dtype=bool)
    if table.dummy_prefix_conditional and starts_with_space is not None:
        rows &= ~starts_with_space
    return rows


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
