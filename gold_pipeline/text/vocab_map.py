"""Student id <-> teacher id pairs whose token bytes are identical (so "Ġthe" matches "▁the").

Used by the hybrid loss: matched columns get a generalized JSD, the rest ULD. Special tokens and tokens without
bytes never match. The map is one-to-one: when several ids of one side spell the same bytes (SentencePiece
byte-fallback "<0x41>" next to the regular "A", or a plain-text added token repeating a vocabulary entry), the
regular one is used (not byte fallback, then the lowest id).

The join is vectorized: every token's bytes get a 64-bit polynomial hash (numpy, no per-token Python), both sides
are joined on the hashes, and every pair the hashes put together is then checked byte for byte; if two different
byte strings ever share a hash, the exact dict join (`build_vocab_map_exact`) is used instead.
`cached_vocab_map` keeps the result on disk, keyed by both tables' contents (what `gold align` uses).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from gold_pipeline.text.bytes import ByteTable

_HASH_BASE = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime; any odd multiplier > 255 works
_HASH_LENGTH = np.uint64(0x9E3779B97F4A7C15)  # mixes the length in, so b"a" and b"\x00a" differ


def _real_ids(table: ByteTable) -> np.ndarray:
    """(n,) ids with bytes that are not special tokens, ascending."""
    return np.flatnonzero((table.lengths > 0) & ~table.is_special)


def _fallback(table: ByteTable) -> np.ndarray:
    """(V,) bool: SentencePiece byte-fallback pieces (all False when the table has none)."""
    if table.is_byte_fallback is None:
        return np.zeros(table.lengths.size, dtype=bool)
    return table.is_byte_fallback


def _canonical_ids(table: ByteTable) -> dict[bytes, int]:
    """bytes -> the one id of `table` that stands for them (regular before byte fallback, then lowest id)."""
    ids = _real_ids(table)
    fallback = _fallback(table)
    # insert the least preferred first so the preferred one overwrites it
    order = ids[np.lexsort((-ids, -fallback[ids].astype(np.int8)))]
    token_bytes = table.token_bytes
    return {token_bytes[i]: i for i in order.tolist()}


def build_vocab_map_exact(student_table: ByteTable, teacher_table: ByteTable) -> np.ndarray:
    """build_vocab_map as a hash join of the two sides' canonical byte -> id dicts (the reference)."""
    teacher_index = _canonical_ids(teacher_table)
    student_index = _canonical_ids(student_table)
    get = teacher_index.get
    pairs = sorted((s, t) for b, s in student_index.items() if (t := get(b)) is not None)
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.asarray(pairs, dtype=np.int64)  # (M, 2)


def _token_hashes(table: ByteTable, ids: np.ndarray) -> np.ndarray | None:
    """(n,) uint64 polynomial hash of each id's bytes and length; `ids` = _real_ids(table) (all ids with bytes,
    ascending). None unless their bytes are exactly `table.flat` back to back (as byte_table builds it)."""
    lengths = table.lengths[ids].astype(np.int64)  # (n,)
    starts = table.offsets[ids]  # (n,)
    total = int(starts[-1] + lengths[-1])
    if total != table.flat.size or starts[0] != 0 or not np.array_equal(starts[1:], starts[:-1] + lengths[:-1]):
        return None
    # byte j of a token of length L weighs BASE**(L-1-j): the hash of the token is Horner's polynomial
    power = np.ones(int(lengths.max()), dtype=np.uint64)  # (max L,) BASE**k, wrapping mod 2**64
    np.cumprod(np.full(power.size - 1, _HASH_BASE, dtype=np.uint64), out=power[1:])
    exponent = np.repeat(starts + lengths - 1, lengths)  # (bytes,) index of the byte's token's last byte
    exponent -= np.arange(total, dtype=np.int64)
    weighted = power[exponent]
    weighted *= table.flat
    hashes = np.add.reduceat(weighted, starts)  # (n,) lengths > 0, so no empty segment
    hashes += lengths.astype(np.uint64) * _HASH_LENGTH
    return hashes


def _bytes_equal(first: ByteTable, first_ids: np.ndarray, second: ByteTable, second_ids: np.ndarray) -> bool:
    """Whether first.token_bytes[first_ids[i]] == second.token_bytes[second_ids[i]] for every i."""
    from gold_pipeline.text.bytes import decode_bytes_array

    if not np.array_equal(first.lengths[first_ids], second.lengths[second_ids]):
        return False
    return np.array_equal(decode_bytes_array(first, first_ids, strip_dummy_prefix=False),
                          decode_bytes_array(second, second_ids, strip_dummy_prefix=False))  # fmt: skip


def _canonical_hashed(table: ByteTable) -> tuple[np.ndarray, np.ndarray] | None:
    """(hashes (K,) sorted unique uint64, ids (K,)): the preferred id per distinct byte string; None when two
    different byte strings of the table share a hash or its bytes are not laid out as byte_table lays them out
    (the caller then uses the exact join)."""
    ids = _real_ids(table)
    if ids.size == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    hashes = _token_hashes(table, ids)
    if hashes is None:
        return None
    order = np.argsort(hashes)
    hashes, ids = hashes[order], ids[order]
    first = np.ones(ids.size, dtype=bool)
    first[1:] = hashes[1:] != hashes[:-1]
    duplicates = np.flatnonzero(~first)  # each repeats the hash of the entry before it
    if duplicates.size:
        if not _bytes_equal(table, ids[duplicates], table, ids[duplicates - 1]):
            return None
        # several ids spell the same bytes: keep the regular one (not byte fallback), then the lowest id
        vocab = np.int64(table.lengths.size)
        preference = _fallback(table)[ids] * vocab + ids  # (n,) smaller = preferred
        ids = np.minimum.reduceat(preference, np.flatnonzero(first)) % vocab
        return hashes[first], ids
    return hashes, ids


def build_vocab_map(student_table: ByteTable, teacher_table: ByteTable) -> np.ndarray:
    """(M, 2) int64 [student_id, teacher_id] for identical non-empty, non-special bytes, sorted by student_id.

    One-to-one (the preferred id of each byte string on each side); equal to `build_vocab_map_exact`.
    """
    student = _canonical_hashed(student_table)
    teacher = _canonical_hashed(teacher_table)
    if student is None or teacher is None:
        return build_vocab_map_exact(student_table, teacher_table)
    _, student_at, teacher_at = np.intersect1d(student[0], teacher[0], assume_unique=True, return_indices=True)
    student_ids, teacher_ids = student[1][student_at], teacher[1][teacher_at]  # (M,), (M,)
    if not _bytes_equal(student_table, student_ids, teacher_table, teacher_ids):
        return build_vocab_map_exact(student_table, teacher_table)
    order = np.argsort(student_ids)
    return np.stack([student_ids[order], teacher_ids[order]], axis=1).astype(np.int64)  # (M, 2)


def with_extra_pairs(pairs: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """(M', 2) int64: `pairs` (M, 2) plus the rows of `extra` (E, 2) whose student id and teacher id are both
    still unpaired (the map stays one-to-one), sorted by student id."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    extra = np.asarray(extra, dtype=np.int64).reshape(-1, 2)
    free = ~np.isin(extra[:, 0], pairs[:, 0]) & ~np.isin(extra[:, 1], pairs[:, 1])  # (E,)
    merged = np.concatenate([pairs, extra[free]])
    return merged[np.argsort(merged[:, 0], kind="stable")]


# bump when build_vocab_map gives another result for the same tables (invalidates the on-disk cache)
_CACHE_VERSION = 1


def _table_digest(table: ByteTable) -> bytes:
    """sha256 of everything build_vocab_map reads from a table (its bytes, not its name)."""
    digest = hashlib.sha256()
    for array in (table.lengths.astype(np.int64), table.offsets.astype(np.int64), table.is_special.astype(bool),
                  _fallback(table).astype(bool), table.flat.astype(np.uint8)):
        digest.update(f"{array.size};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.digest()


def cached_vocab_map(student_table: ByteTable, teacher_table: ByteTable) -> np.ndarray:
    """build_vocab_map, kept on disk under $GOLD_CACHE_DIR/vocab_maps/ (default ~/.cache/gold) and keyed by a
    sha256 of both tables' contents, so a later run with the same pair loads it (~1 ms) instead of building it
    (~30 ms for two 100k+ vocabularies). A missing, unreadable or malformed file is rebuilt; a cache folder that
    cannot be written only means the map is not kept."""
    from gold_pipeline.resources import cache_dir

    key = hashlib.sha256(f"gold-vocab-map-v{_CACHE_VERSION}".encode() + _table_digest(student_table)
                         + _table_digest(teacher_table)).hexdigest()  # fmt: skip
    path = cache_dir() / "vocab_maps" / f"{key}.npy"
    try:
        pairs = np.load(path, allow_pickle=False)
        if _well_formed(pairs, student_table.vocab_size, teacher_table.vocab_size):
            return pairs
    except (OSError, ValueError, EOFError):
        pass
    pairs = build_vocab_map(student_table, teacher_table)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            np.save(handle, pairs, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return pairs


def _well_formed(pairs: np.ndarray, student_vocab: int, teacher_vocab: int) -> bool:
    """(M, 2) int64, student ids strictly increasing, every id inside its vocabulary, teacher ids unique."""
    if pairs.dtype != np.int64 or pairs.ndim != 2 or pairs.shape[1] != 2:
        return False
    if not pairs.size:
        return True
    student, teacher = pairs[:, 0], pairs[:, 1]
    return bool(np.all(np.diff(student) > 0) and student[0] >= 0 and student[-1] < student_vocab
                and teacher.min() >= 0 and teacher.max() < teacher_vocab
                and np.bincount(teacher, minlength=teacher_vocab).max() <= 1)  # fmt: skip
