"""Many completions aligned at once, with the same results as `align_completion` row by row (DESIGN.md §2).

Each row's bytes get a slot of their own in one byte space, boundaries are marked in a boolean array over it, and
only rows whose bytes disagree go through align_completion one by one. A big batch is split into contiguous parts
aligned on threads (numpy releases the GIL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from gold_pipeline.align.groups import STATUS_OK, Alignment, align_completion
from gold_pipeline.data.ragged import flatten, row_sums, starts_of
from gold_pipeline.text.bytes import ByteTable, dummy_prefix_rows, gather_bytes, token_spans, valid_utf8_prefix

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
    student_ids, student_starts = flatten(student_rows)  # (N,), (R+1,)
    teacher_ids, teacher_starts = flatten(teacher_rows)  # (M,), (R+1,)
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


def _encode_text(text) -> bytes | None:
    """UTF-8 of a str text; None for anything else (bytes, None, lone surrogates: align_completion decides)."""
    if not isinstance(text, str):
        return None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


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
    student_lengths, student_offsets = token_spans(student_table, student_ids, student_starts,
                                                    dummy_prefix_rows(student_table, starts_with_space, count))
    teacher_lengths, teacher_offsets = token_spans(teacher_table, teacher_ids, teacher_starts,
                                                    dummy_prefix_rows(teacher_table, starts_with_space, count))
    student_totals = row_sums(student_lengths, student_starts)  # (R,) bytes per row
    teacher_totals = row_sums(teacher_lengths, teacher_starts)
    student_bytes = gather_bytes(student_table.flat, student_offsets, student_lengths).tobytes()
    teacher_bytes = gather_bytes(teacher_table.flat, teacher_offsets, teacher_lengths).tobytes()
    byte_starts = starts_of(student_totals)  # (R+1,) of each row in student_bytes

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
        bs, ts = byte_starts.tolist(), starts_of(teacher_totals).tolist()
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
    groups_per_row = row_sums(student_closes, student_starts)  # (R,)
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
