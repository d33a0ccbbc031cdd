"""Student id <-> teacher id pairs whose token bytes are identical (so "Ġthe" matches "▁the").

Used by the hybrid loss: matched columns get a generalized JSD, the rest ULD. Special tokens and tokens without
bytes never match. The map is one-to-one: when several ids of one side spell the same bytes (SentencePiece
byte-fallback "<0x41>" next to the regular "A", or a plain-text added token repeating a vocabulary entry), the
regular one is used (not byte fallback, then the lowest id).
"""

from __future__ import annotations

import numpy as np

from gold_pipeline.byte_tables import ByteTable


def _canonical_ids(table: ByteTable) -> dict[bytes, int]:
    """bytes -> the one id of `table` that stands for them (regular before byte fallback, then lowest id)."""
    keep = (table.lengths > 0) & ~table.is_special
    fallback = table.is_byte_fallback if table.is_byte_fallback is not None else np.zeros_like(keep)
    ids = np.flatnonzero(keep)
    # insert the least preferred first so the preferred one overwrites it
    order = ids[np.lexsort((-ids, -fallback[ids].astype(np.int8)))]
    token_bytes = table.token_bytes
    return {token_bytes[i]: i for i in order.tolist()}


def build_vocab_map(student_table: ByteTable, teacher_table: ByteTable) -> np.ndarray:
    """(M, 2) int64 [student_id, teacher_id] for identical non-empty, non-special bytes, sorted by student_id.

    A hash join of the two sides' canonical byte -> id dicts; one-to-one.
    """
    teacher_index = _canonical_ids(teacher_table)
    student_index = _canonical_ids(student_table)
    get = teacher_index.get
    pairs = sorted((s, t) for b, s in student_index.items() if (t := get(b)) is not None)
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.asarray(pairs, dtype=np.int64)  # (M, 2)
