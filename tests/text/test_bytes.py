"""Byte tables: golden bytes per family, specials, dummy prefix, round trips, family detection."""

from __future__ import annotations

import numpy as np
import pytest

from gold_pipeline.text.bytes import (
    byte_table,
    completion_byte_lengths,
    decode_bytes,
    decode_bytes_array,
    detect_family,
)
from gold_pipeline.text.encode import encode_completion
from gold_pipeline.text.tokenizers import load_tokenizer
from tests.helpers import table, tok

ALL = ["pkg:deepseek-v3", "pkg:mistral-sp-v1", "pkg:mistral-tekken", "pkg:qwen", "pkg:cl100k", "pkg:smollm2",
       "pkg:gemma3"]  # fmt: skip
TEXTS = [
    "Hello  world\n\tfoo 😀 ",
    " leading",
    "  two",
    "👍🏽👩‍👩‍👧 family 🏳️‍🌈",
    "中文字符 日本語のテキスト 한국어",
    "e\u0301 a\u0308 ñ ﬁ",
    "12345 3.14159",
    "a    b\t\t\tc\n\n\n\nd\r\n e",
    "def f(x):\n    return x**2  # comment\n",
    "   ",
    "\n",
    "trailing   ",
    "<|im_end|> <s> </s> [INST] <start_of_turn> <table>",
    "\u200b\ufeff",
    "",
]


def tokens_and_bytes(name: str, text: str) -> list[tuple[str, bytes]]:
    ids = encode_completion(tok(name), text)
    return [(t, table(name).token_bytes[i]) for t, i in zip(tok(name).convert_ids_to_tokens(ids), ids)]


# -- golden cases per family --------------------------------------------------------------------------------


def test_golden_byte_level_smollm2():
    assert table("pkg:smollm2").family == "byte_level"
    assert tokens_and_bytes("pkg:smollm2", "Hi there\n") == [("Hi", b"Hi"), ("Ġthere", b" there"), ("Ċ", b"\n")]
    # a 4-byte emoji split over two byte-level tokens: each carries raw (partial) UTF-8 bytes
    pieces = tokens_and_bytes("pkg:smollm2", "😀")
    assert b"".join(b for _, b in pieces) == "😀".encode() and len(pieces) >= 1


def test_golden_tiktoken_cl100k():
    assert table("pkg:cl100k").family == "tiktoken"
    assert encode_completion(tok("pkg:cl100k"), "Hello world") == [9906, 1917]
    assert tokens_and_bytes("pkg:cl100k", "Hello world") == [("Hello", b"Hello"), ("Ġworld", b" world")]


def test_golden_sentencepiece_mistral_with_dummy_prefix_and_byte_fallback():
    t = table("pkg:mistral-sp-v1")
    assert t.family == "sentencepiece" and t.dummy_prefix and not t.dummy_prefix_conditional
    pairs = tokens_and_bytes("pkg:mistral-sp-v1", "Hi\nthere")
    assert pairs == [("▁Hi", b" Hi"), ("<0x0A>", b"\n"), ("there", b"there")]
    ids = encode_completion(tok("pkg:mistral-sp-v1"), "Hi\nthere")
    assert completion_byte_lengths(t, ids).tolist() == [2, 1, 5]  # dummy-prefix space removed from token 0
    assert decode_bytes(t, ids) == b"Hi\nthere"


def test_golden_sentencepiece_gemma_without_dummy_prefix():
    t = table("pkg:gemma3")
    assert t.family == "sentencepiece" and not t.dummy_prefix
    assert tokens_and_bytes("pkg:gemma3", "Hi there") == [("Hi", b"Hi"), ("▁there", b" there")]


def test_golden_byte_level_deepseek_and_tekken():
    assert table("pkg:deepseek-v3").family == "byte_level"
    assert tokens_and_bytes("pkg:deepseek-v3", "a b") == [("a", b"a"), ("Ġb", b" b")]
    assert table("pkg:mistral-tekken").family == "tiktoken"
    assert b"".join(b for _, b in tokens_and_bytes("pkg:mistral-tekken", "a 中")) == "a 中".encode()


@pytest.mark.parametrize("name", ALL)
def test_special_tokens_have_no_bytes(name):
    t, tokenizer = table(name), tok(name)
    for special in tokenizer.all_special_ids:
        assert t.token_bytes[special] == b"" and t.lengths[special] == 0 and t.is_special[special]
    assert t.lengths.dtype == np.int32 and t.lengths.shape == (len(t.token_bytes),)
    assert np.all((t.lengths == 0) | ~t.is_special)


@pytest.mark.parametrize("name", ALL)
def test_decode_round_trips_every_text(name):
    t = table(name)
    for text in TEXTS:
        ids = encode_completion(tok(name), text)
        assert decode_bytes(t, ids) == text.encode(), (name, text)
        assert int(completion_byte_lengths(t, ids).sum()) == len(text.encode())


def test_decode_bytes_array_matches_python_join():
    t = table("pkg:qwen")
    ids = encode_completion(tok("pkg:qwen"), TEXTS[3] + TEXTS[8])
    assert decode_bytes_array(t, ids).tobytes() == b"".join(t.token_bytes[i] for i in ids)


def test_tables_are_cached_per_fingerprint():
    first = table("pkg:mistral-sp-v1")
    again = byte_table(load_tokenizer("pkg:mistral-sp-v1"))  # a fresh object of the same tokenizer
    assert again is first and first.fingerprint


def test_family_is_detected_from_the_backend_not_the_name():
    assert detect_family({"pre_tokenizer": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"}}) == "byte_level"
    assert (
        detect_family({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}, "decoder": None})
        == "sentencepiece"
    )
    assert (
        detect_family(
            {
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel"}]},
                "model": {"type": "BPE", "ignore_merges": True},
            }
        )
        == "tiktoken"
    )
    assert detect_family({"pre_tokenizer": {"type": "Whitespace"}}) == "other"
