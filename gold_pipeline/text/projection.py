"""Projection table: how the bytes of every student token decompose into teacher tokens (issue 14).

One row per student id with bytes (special tokens and ids without bytes have none). For each, the teacher
tokenizer re-tokenizes the token's bytes on their own (the same call the alignment uses for a completion,
`encode_completions`), and the result is checked byte for byte against the student token (dummy-prefix rule of
`text.bytes.strips_dummy_prefix`). Where that check fails (bytes that are not valid UTF-8 on their own, a normalizer
that changes the text) the bytes are split greedily into the longest teacher tokens instead. ``kind``:

* ``"matched"``: the bytes are exactly one teacher token: the vocab-map pair (`text.vocab_map`), weight 1.
* ``"projected"``: 2..``max_pieces`` teacher tokens (default 4, X-Token's limit).
* ``"too_long"``: more teacher tokens than that (the pieces are still listed).
* ``"unencodable"``: no teacher token sequence spells the bytes (no pieces).

``weights`` are X-Token's projection weights (arXiv 2605.21699: exact match 1; otherwise decaying over the
sub-tokens, here ``decay ** j`` for piece j, each row normalized to sum 1). The loss of ``losses.projection`` does
not use them: inside an alignment group it knows the teacher's distribution at every position of the teacher's
actual token path, so it uses the chain rule instead (P(123) = P(1) P(2|1) P(3|12), exact wherever the student
token's first pieces lie on that path). The weights are kept so the table also serves X-Token's P-KL.

Everything is vectorized except the per-token byte check (about 1 s for a 150k vocabulary); `cached_projection`
keeps the result on disk keyed by both byte tables, as `cached_vocab_map` does.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from gold_pipeline.text.bytes import ByteTable, strips_dummy_prefix
from gold_pipeline.text.vocab_map import _canonical_ids, _table_digest, cached_vocab_map

KINDS = ("matched", "projected", "too_long", "unencodable")
MAX_PIECES = 4
DECAY = 0.5
_CACHE_VERSION = 1


@dataclass(frozen=True, eq=False)
class ProjectionTable:
    """Columns of the projection table (R rows, one per student id with bytes).

    student_ids (R,) int64 ascending; kinds (R,) int8 index into KINDS; offsets (R+1,) int64 into pieces/weights;
    pieces (P,) int64 teacher ids; weights (P,) float32 (one row's weights sum to 1).
    """

    student_ids: np.ndarray
    kinds: np.ndarray
    offsets: np.ndarray
    pieces: np.ndarray
    weights: np.ndarray

    def counts(self) -> dict[str, int]:
        """Rows per kind."""
        return {kind: int((self.kinds == i).sum()) for i, kind in enumerate(KINDS)}

    def coverage(self, student_table: ByteTable) -> dict[str, float]:
        """Share of the student ids with bytes, and of the numeral ones (digits after an optional leading space),
        that are matched or projected (what the projection loss can compare token by token)."""
        covered = np.isin(self.kinds, [KINDS.index("matched"), KINDS.index("projected")])
        token_bytes = student_table.token_bytes
        numeral = np.fromiter((token_bytes[i].lstrip(b" ").isdigit() for i in self.student_ids.tolist()),
                              dtype=bool, count=self.student_ids.size)
        return {"tokens": float(covered.mean()) if covered.size else 0.0,
                "numeral_tokens": float(covered[numeral].mean()) if numeral.any() else 0.0,
                "numeral_tokens_matched": float((self.kinds[numeral] == KINDS.index("matched")).mean())
                if numeral.any() else 0.0}

    def row(self, student_id: int) -> tuple[str, list[int]]:
        """(kind, teacher pieces) of one student id (KeyError when the id has no bytes)."""
        at = int(np.searchsorted(self.student_ids, student_id))
        if at >= self.student_ids.size or self.student_ids[at] != student_id:
            raise KeyError(f"student id {student_id} has no bytes, so it has no projection row.")
        return KINDS[self.kinds[at]], self.pieces[self.offsets[at]:self.offsets[at + 1]].tolist()


def xtoken_weights(count: int, decay: float = DECAY) -> np.ndarray:
    """(count,) float32 X-Token-style weights of a decomposition into `count` pieces: decay ** j, normalized."""
    weights = decay ** np.arange(count, dtype=np.float64)
    return (weights / weights.sum()).astype(np.float32)


def _greedy(data: bytes, index: dict[bytes, int], longest: int) -> list[int] | None:
    """Longest-match split of `data` into teacher tokens (None when some byte has no token)."""
    out, at = [], 0
    while at < len(data):
        for end in range(min(len(data), at + longest), at, -1):
            tid = index.get(data[at:end])
            if tid is not None:
                out.append(tid)
                at = end
                break
        else:
            return None
    return out


def _spells(teacher_table: ByteTable, ids: list[int], data: bytes, text: str) -> bool:
    token_bytes = teacher_table.token_bytes
    joined = b"".join(token_bytes[i] for i in ids)
    if joined == data:
        return True
    return (strips_dummy_prefix(teacher_table, text[:1] == " ") and joined[:1] == b" " and joined[1:] == data)


def build_projection(student_table: ByteTable, teacher_table: ByteTable, teacher_tokenizer, *,
                     max_pieces: int = MAX_PIECES, decay: float = DECAY) -> ProjectionTable:
    """The projection table of a (student, teacher) pair (see the module docstring)."""
    from gold_pipeline.text.encode import encode_completions

    if max_pieces < 2:
        raise ValueError(f"max_pieces must be >= 2 (got {max_pieces}); 1 would only repeat the vocab map.")
    real = np.flatnonzero((student_table.lengths > 0) & ~student_table.is_special)  # (R,)
    pairs = cached_vocab_map(student_table, teacher_table)  # (M, 2)
    matched = dict(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))
    todo = [int(i) for i in real.tolist() if int(i) not in matched]
    datas = [student_table.token_bytes[i] for i in todo]
    texts: list[str | None] = []
    for data in datas:
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(None)
    decodable = [k for k, text in enumerate(texts) if text is not None]
    encoded = encode_completions(teacher_tokenizer, [texts[k] for k in decodable]) if decodable else []
    pieces_of: dict[int, list[int] | None] = {}
    for k, ids in zip(decodable, encoded):
        if _spells(teacher_table, ids, datas[k], texts[k]):
            pieces_of[k] = list(ids)
    index = _canonical_ids(teacher_table)
    longest = int(teacher_table.lengths.max()) if teacher_table.lengths.size else 0
    for k, data in enumerate(datas):
        if k not in pieces_of:
            pieces_of[k] = _greedy(data, index, longest)
    by_id = {sid: pieces_of[k] for k, sid in enumerate(todo)}

    kinds = np.empty(real.size, dtype=np.int8)
    lengths = np.empty(real.size, dtype=np.int64)
    flat: list[int] = []
    wflat: list[np.ndarray] = []
    for r, sid in enumerate(real.tolist()):
        pieces = [matched[sid]] if sid in matched else by_id[sid]
        if pieces is None:
            kinds[r], lengths[r] = KINDS.index("unencodable"), 0
            continue
        kinds[r] = KINDS.index("matched" if sid in matched else "projected" if len(pieces) <= max_pieces
                               else "too_long")
        lengths[r] = len(pieces)
        flat.extend(pieces)
        wflat.append(xtoken_weights(len(pieces), decay))
    offsets = np.zeros(real.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    weights = np.concatenate(wflat) if wflat else np.zeros(0, dtype=np.float32)
    return ProjectionTable(real.astype(np.int64), kinds, offsets, np.asarray(flat, dtype=np.int64), weights)


def cached_projection(student_table: ByteTable, teacher_table: ByteTable, teacher_tokenizer, *,
                      max_pieces: int = MAX_PIECES, decay: float = DECAY) -> ProjectionTable:
    """build_projection kept on disk under $GOLD_CACHE_DIR/projections/ keyed by both tables' contents and the
    options (a missing or unreadable file is rebuilt; a folder that cannot be written only means it is not kept)."""
    from gold_pipeline.resources import cache_dir

    key = hashlib.sha256(f"gold-projection-v{_CACHE_VERSION};{max_pieces};{decay!r}".encode()
                         + _table_digest(student_table) + _table_digest(teacher_table)).hexdigest()  # fmt: skip
    path = cache_dir() / "projections" / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            return ProjectionTable(*(data[name] for name in ("student_ids", "kinds", "offsets", "pieces", "weights")))
    except (OSError, ValueError, EOFError, KeyError):
        pass
    table = build_projection(student_table, teacher_table, teacher_tokenizer, max_pieces=max_pieces, decay=decay)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            np.savez(handle, student_ids=table.student_ids, kinds=table.kinds, offsets=table.offsets,
                     pieces=table.pieces, weights=table.weights)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return table


def projection_arrow(table: ProjectionTable):
    """The table as a pyarrow.Table with `data.schemas.PROJECTION_SCHEMA`."""
    import pyarrow as pa

    from gold_pipeline.data.schemas import PROJECTION_SCHEMA

    offsets = pa.array(table.offsets.astype(np.int32))
    return pa.Table.from_arrays([
        pa.array(table.student_ids.astype(np.int32)),
        pa.array(np.asarray(KINDS, dtype=object)[table.kinds].tolist(), type=pa.string()),
        pa.ListArray.from_arrays(offsets, pa.array(table.pieces.astype(np.int32))),
        pa.ListArray.from_arrays(offsets, pa.array(table.weights.astype(np.float32))),
    ], schema=PROJECTION_SCHEMA)
