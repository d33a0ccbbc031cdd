"""Exact bytes of every token id, per tokenizer family (DESIGN.md §2).

- byte_level: GPT-2/Llama-3/Qwen/SmolLM2/DeepSeek style "Ġ"/"Ċ" strings -> invert the bytes<->unicode table.
- tiktoken: tiktoken-derived vocabularies built as byte-level BPE with `ignore_merges` (what gold builds for
  pkg:cl100k/qwen/mistral-tekken, and what Llama-3 style tokenizer.json files hold); same decoding as byte_level.
- sentencepiece: "▁" is a space, "<0xNN>" byte-fallback pieces are one byte; the dummy-prefix space the
  tokenizer adds at the start of a text is not part of the text (`dummy_prefix`).
- other: decoded one token at a time (best effort; alignment then verifies the bytes against the text).

Special/control tokens and ids with no token have no bytes (b"", is_special True). The family is detected from
the tokenizer's backend (normalizer/pre-tokenizer/decoder/model JSON), never from its name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True, eq=False)
class ByteTable:
    family: str  # "byte_level" | "sentencepiece" | "tiktoken" | "other"
    token_bytes: tuple[bytes, ...]  # id -> exact bytes (b"" for special/control tokens and unused ids)
    lengths: np.ndarray  # (V,) int32 byte length per id (0 for specials)
    is_special: np.ndarray  # (V,) bool
    dummy_prefix: bool  # the tokenizer adds a leading space at text start that is not part of the text
    # additions beyond the contract:
    dummy_prefix_conditional: bool = False  # the dummy space is added only when the text does not start with one
    flat: np.ndarray = field(default=None, repr=False)  # (sum lengths,) uint8: all token bytes concatenated
    offsets: np.ndarray = field(default=None, repr=False)  # (V,) int64 start of each id's bytes in `flat`
    is_byte_fallback: np.ndarray = field(default=None, repr=False)  # (V,) bool: SentencePiece <0xNN> pieces
    fingerprint: str = ""  # sha256 of the vocabulary/added tokens/pipeline the table was built from

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)


_CACHE: dict[str, ByteTable] = {}


def _component_state(component) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def byte_table(tokenizer) -> ByteTable:
    """The ByteTable of a `PreTrainedTokenizerFast`, built once per tokenizer content and cached (on the object
    and in a process-wide dict keyed by a sha256 of the vocabulary, added tokens and pipeline components)."""
    table = getattr(tokenizer, "_gold_byte_table", None)
    if table is not None:
        return table
    backend = tokenizer.backend_tokenizer
    state = {
        "normalizer": _component_state(backend.normalizer),
        "pre_tokenizer": _component_state(backend.pre_tokenizer),
        "decoder": _component_state(backend.decoder),
        "model": {
            "type": type(backend.model).__name__,
            "ignore_merges": bool(getattr(backend.model, "ignore_merges", False)),
            "byte_fallback": bool(getattr(backend.model, "byte_fallback", False)),
        },
    }
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=False)
    added = {i: (t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()}
    specials = sorted(s for s in tokenizer.all_special_tokens if s)
    digest = hashlib.sha256(json.dumps([state, sorted(added.items()), specials], sort_keys=True).encode())
    digest.update(_SEP.join(sorted(vocab, key=vocab.__getitem__)).encode("utf-8", "surrogatepass"))
    key = digest.hexdigest()
    table = _CACHE.get(key)
    if table is None:
        table = _build(tokenizer, state, vocab, added, specials, key)
        _CACHE[key] = table
    tokenizer._gold_byte_table = table
    return table


_SEP = "\U0010fffe"  # a noncharacter: never inside a vocabulary entry (checked by the split count)


def _types(node) -> list[str]:
    """All "type" values in a JSON component tree (a Sequence's children included)."""
    found: list[str] = []
    if isinstance(node, dict):
        if "type" in node:
            found.append(node["type"])
        for value in node.values():
            found.extend(_types(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_types(value))
    return found


def _sentencepiece_like(state: dict) -> bool:
    def has_meta(node) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                return True
            if node.get("type") == "Replace" and "▁" in json.dumps(node, ensure_ascii=False):
                return True
            if node.get("type") == "Prepend" and node.get("prepend") == "▁":
                return True
            return any(has_meta(v) for v in node.values())
        if isinstance(node, list):
            return any(has_meta(v) for v in node)
        return False

    return any(has_meta(state.get(k)) for k in ("normalizer", "pre_tokenizer", "decoder"))


def detect_family(state: dict) -> str:
    """Family of a tokenizer from its `tokenizers` JSON state (normalizer, pre_tokenizer, decoder, model)."""
    model = state.get("model") or {}
    pre, dec = _types(state.get("pre_tokenizer")), _types(state.get("decoder"))
    if "ByteLevel" in pre or "ByteLevel" in dec:
        if model.get("type") == "BPE" and model.get("ignore_merges") and "Split" in pre:
            return "tiktoken"
        return "byte_level"
    if _sentencepiece_like(state):
        return "sentencepiece"
    return "other"


def _byte_level_bytes(tokens: list[str]) -> list[bytes]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decode = str.maketrans({char: chr(byte) for byte, char in bytes_to_unicode().items()})
    sep = "\x00\x00\x00\x00GOLD\x00\x00\x00\x00"  # decodes to itself (NUL is not a byte-level character)

    def convert_all(text: str) -> bytes:
        return text.translate(decode).encode("latin-1")

    try:
        joined = convert_all(sep.join(tokens))
        parts = joined.split(sep.encode("latin-1"))
        if len(parts) == len(tokens):
            return parts
    except UnicodeEncodeError:
        pass
    out: list[bytes] = []
    for token in tokens:  # slow path: some entries are not byte-level strings (plain-text tokens)
        try:
            out.append(convert_all(token))
        except UnicodeEncodeError:
            out.append(token.encode("utf-8"))
    return out


def _sentencepiece_bytes(tokens: list[str], byte_fallback: bool) -> list[bytes]:
    sep = "\x00\x00GOLD\x00\x00"
    joined = sep.join(tokens).replace("▁", " ").encode("utf-8", "surrogatepass").split(sep.encode())
    out = joined if len(joined) == len(tokens) else [t.replace("▁", " ").encode("utf-8") for t in tokens]
    if byte_fallback:
        for index, token in enumerate(tokens):
            if len(token) == 6 and token.startswith("<0x"):
                match = _BYTE_PIECE.match(token)
                if match:
                    out[index] = bytes([int(match.group(1), 16)])
    return out


def _build(tokenizer, state: dict, vocab: dict[str, int], added: dict, specials: list[str], key: str) -> ByteTable:
    backend = tokenizer.backend_tokenizer
    family = detect_family(state)
    size = max([*vocab.values(), *added.keys(), -1]) + 1
    token_bytes: list[bytes] = [b""] * size
    is_special = np.ones(size, dtype=bool)  # ids with no token stay "special" (no bytes)

    tokens = list(vocab.keys())
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
    if family in ("byte_level", "tiktoken"):
        decoded = _byte_level_bytes(tokens)
    elif family == "sentencepiece":
        decoded = _sentencepiece_bytes(tokens, state["model"]["byte_fallback"])
    else:
        decoded = [backend.decode([int(i)], skip_special_tokens=False).encode("utf-8") for i in ids]
    for i, b in zip(ids.tolist(), decoded):
        token_bytes[i] = b
    is_special[ids] = False
    for i, (content, special) in added.items():
        if special:
            token_bytes[i], is_special[i] = b"", True
        else:  # a non-special added token matches its literal text
            token_bytes[i], is_special[i] = content.encode("utf-8"), False
    for name in specials:  # unk/control pieces of the model vocab registered as special (e.g. <unk>, <s>)
        i = vocab.get(name)
        if i is not None:
            token_bytes[i], is_special[i] = b"", True

    is_byte_fallback = np.zeros(size, dtype=bool)
    if family == "sentencepiece" and state["model"]["byte_fallback"]:
        for i, token in zip(ids.tolist(), tokens):
            if len(token) == 6 and _BYTE_PIECE.match(token):
                is_byte_fallback[i] = True
    lengths = np.fromiter(map(len, token_bytes), dtype=np.int32, count=size)
    offsets = np.zeros(size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    flat = np.frombuffer(b"".join(token_bytes), dtype=np.uint8)
    table = ByteTable(
        family=family, token_bytes=tuple(token_bytes), lengths=lengths, is_special=is_special,
        dummy_prefix=False, flat=flat, offsets=offsets, is_byte_fallback=is_byte_fallback, fingerprint=key,
    )  # fmt: skip
    dummy, conditional = _probe_dummy_prefix(tokenizer, table)
    if dummy:
        object.__setattr__(table, "dummy_prefix", True)
        object.__setattr__(table, "dummy_prefix_conditional", conditional)
    return table


def _probe_dummy_prefix(tokenizer, table: ByteTable) -> tuple[bool, bool]:
    """(adds a dummy space at text start, only when the text does not already start with a space)."""

    def text_of(sample: str) -> bytes:
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        return b"".join(table.token_bytes[i] for i in ids)

    if text_of("a") != b" a":
        return False, False
    return True, text_of(" a") == b" a"


# ----------------------------------------------------------------------------------------------------------


def valid_utf8_prefix(data: bytes) -> int:
    """Length in bytes of the longest prefix of `data` that is valid UTF-8 ending on a character boundary."""
    try:
        data.decode("utf-8")
        return len(data)
    except UnicodeDecodeError as error:
        return error.start


def strips_dummy_prefix(table: ByteTable, text_starts_with_space: bool | None = None) -> bool:
    """Whether the leading space of a text's first byte-carrying token is the tokenizer's dummy prefix (not text).

    The one place this SentencePiece rule lives: a table with `dummy_prefix` adds a space at the start of every
    text, except (`dummy_prefix_conditional`) a text that already starts with one. text_starts_with_space: None when
    the text is not known (then a conditional table is assumed to have added it)."""
    if not table.dummy_prefix:
        return False
    return not (table.dummy_prefix_conditional and text_starts_with_space)


def dummy_prefix_rows(table: ByteTable, starts_with_space: np.ndarray | None, count: int) -> np.ndarray | None:
    """`strips_dummy_prefix` for `count` texts at once: (R,) bool, or None when the table has no dummy prefix.
    starts_with_space: (R,) bool per text, or None when the texts are not known."""
    if not table.dummy_prefix:
        return None
    rows = np.ones(count, dtype=bool)
    if table.dummy_prefix_conditional and starts_with_space is not None:
        rows &= ~starts_with_space
    return rows


def token_spans(table: ByteTable, ids: np.ndarray, starts: np.ndarray, strip_rows: np.ndarray | None):
    """(lengths (N,) int32, offsets (N,) int64 into table.flat) of each token of R rows laid end to end.

    ids: (N,) int64; starts: (R+1,) row starts. In the rows where strip_rows (R,) is True the first token with
    bytes loses its leading space when it has one (the dummy prefix)."""
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


def gather_bytes(flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(sum lengths,) uint8: flat[offsets[i] : offsets[i] + lengths[i]] of every token back to back, gathered with
    one vectorized index (no per-token loop)."""
    total = int(lengths.sum(dtype=np.int64))
    if total == 0:
        return np.zeros(0, dtype=np.uint8)
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
    return np.take(flat, np.cumsum(step, out=step))


def _one_row(table: ByteTable, ids, strip_dummy_prefix: bool | None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)  # (n,)
    strip = strips_dummy_prefix(table) if strip_dummy_prefix is None else strip_dummy_prefix
    return token_spans(table, ids, np.array([0, ids.size], dtype=np.int64), np.array([strip]))


def completion_byte_lengths(table: ByteTable, ids, *, strip_dummy_prefix: bool | None = None) -> np.ndarray:
    """(n,) int32 byte length of each token of a completion; the dummy-prefix space is removed from the first
    token that has bytes. strip_dummy_prefix: None = `strips_dummy_prefix(table)`; pass
    `strips_dummy_prefix(table, text[:1] == " ")` when the text is known."""
    return _one_row(table, ids, strip_dummy_prefix)[0]


def decode_bytes_array(table: ByteTable, ids, *, strip_dummy_prefix: bool | None = None) -> np.ndarray:
    """(bytes,) uint8 concatenated bytes of `ids` (dummy prefix removed as in completion_byte_lengths)."""
    lengths, offsets = _one_row(table, ids, strip_dummy_prefix)
    return gather_bytes(table.flat, offsets, lengths)


def decode_bytes(table: ByteTable, ids, *, strip_dummy_prefix: bool | None = None) -> bytes:
    """Concatenated bytes of `ids` (dummy prefix removed)."""
    return decode_bytes_array(table, ids, strip_dummy_prefix=strip_dummy_prefix).tobytes()
