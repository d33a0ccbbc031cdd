"""Alignment on real packaged tokenizers: golden cases, invariants on hard texts, property tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gold_pipeline.align.batch import align_batch
from gold_pipeline.align.groups import (
    STATUS_INVALID_UTF8_TAIL,
    STATUS_MISMATCH,
    STATUS_OK,
    align_completion,
    align_lengths,
    completion_text_from_ids,
)
from gold_pipeline.text.bytes import byte_table, completion_byte_lengths, decode_bytes
from gold_pipeline.text.encode import encode_completion
from tests.helpers import tok

HARD_TEXTS = [
    "Hello, world!",
    "👍🏽 thumbs, 👩🏾‍💻 coder, 👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag",
    "中文字符测试，日本語のテキスト、한국어 문장。",
    "e\u0301 a\u0308 n\u0303 — combining marks; ÀÉÎÕÜ ﬁ ῼ",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-01-31",
    "runs   of     spaces  and\ttabs\t\t\tand\n\n\nnewlines\r\n end",
    "def f(x: int) -> int:\n    \"\"\"Square.\"\"\"\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    "   leading spaces",
    " one leading space",
    "trailing spaces   ",
    "\n",
    "<|im_end|> <s> </s> [INST] <start_of_turn> literal special text",
    "x",
    "\u200b\u200d zero width \ufeff bom",
    "mixed: αβγ кириллица עברית العربية हिन्दी",
]

PAIRS = [
    ("pkg:mistral-sp-v1", "pkg:deepseek-v3"),
    ("pkg:qwen", "pkg:cl100k"),
    ("pkg:smollm2", "pkg:mistral-sp-v1"),
    ("pkg:gemma3", "pkg:smollm2"),
    ("pkg:mistral-tekken", "pkg:qwen"),
]


def align_text(student: str, teacher: str, text: str):
    s_tok, t_tok = tok(student), tok(teacher)
    s_ids, t_ids = encode_completion(s_tok, text), encode_completion(t_tok, text)
    s_table, t_table = byte_table(s_tok), byte_table(t_tok)
    return align_completion(s_ids, t_ids, s_table, t_table, text), s_ids, t_ids, s_table, t_table


def group_bytes(table, ids, group_ids, num_groups) -> list[bytes]:
    """Bytes of each group on one side, built token by token (the slow, obvious way)."""
    lengths = completion_byte_lengths(table, ids)
    data = decode_bytes(table, ids)
    out = [b""] * num_groups
    pos = 0
    for length, g in zip(lengths.tolist(), group_ids.tolist()):
        if g >= 0:
            out[g] += data[pos : pos + length]
        pos += length
    return out


def invariant_violations(alignment, s_ids, t_ids, s_table, t_table, text: str) -> list[str]:
    problems = []
    for side, g in (("student", alignment.student_group_ids), ("teacher", alignment.teacher_group_ids)):
        kept = g[g >= 0]
        if kept.size and (np.any(np.diff(kept) < 0) or np.any(np.diff(kept) > 1) or kept[0] != 0):
            problems.append(f"{side} groups not in order 0,1,2,...: {g.tolist()}")
        if set(kept.tolist()) != set(range(alignment.num_groups)):
            problems.append(f"{side} does not cover every group")
    s_bytes = group_bytes(s_table, s_ids, alignment.student_group_ids, alignment.num_groups)
    t_bytes = group_bytes(t_table, t_ids, alignment.teacher_group_ids, alignment.num_groups)
    if s_bytes != t_bytes:
        problems.append("group bytes differ between the sides")
    text_bytes = text.encode("utf-8")
    lossless = decode_bytes(s_table, s_ids) == text_bytes == decode_bytes(t_table, t_ids)
    if not lossless:
        # a tokenizer that cannot spell some characters (SmolLM2's vocabulary lacks a few control bytes and
        # the lead bytes 0xF1-0xF7) loses them: that must be detected, and what is kept must be a prefix
        if alignment.status != STATUS_MISMATCH:
            problems.append(f"lossy tokenization not reported as a mismatch (status {alignment.status})")
        if not text_bytes.startswith(b"".join(s_bytes)):
            problems.append("kept groups are not a prefix of the text")
        return problems
    if alignment.status != STATUS_OK:
        problems.append(f"status {alignment.status} for valid text")
    if b"".join(s_bytes) != text_bytes:
        problems.append("groups do not cover every byte of the text")
    for side, g, ids, table in (
        ("student", alignment.student_group_ids, s_ids, s_table),
        ("teacher", alignment.teacher_group_ids, t_ids, t_table),
    ):
        lengths = completion_byte_lengths(table, ids)
        if np.any((g < 0) & (lengths > 0)):
            problems.append(f"{side} has excluded tokens with bytes on valid text")
    return problems


# -- align_lengths golden cases ------------------------------------------------------------------------------


def test_align_lengths_golden():
    # student: "ab|c|def"  teacher: "a|bc|def" -> boundaries at 3 and 6
    s, t, g = align_lengths(np.array([2, 1, 3]), np.array([1, 2, 3]))
    assert s.tolist() == [0, 0, 1] and t.tolist() == [0, 0, 1] and g == 2


def test_align_lengths_zero_length_tokens_are_excluded():
    s, t, g = align_lengths(np.array([0, 2, 0, 1]), np.array([1, 1, 1, 0]))
    assert s.tolist() == [-1, 0, -1, 1] and t.tolist() == [0, 0, 1, -1] and g == 2


def test_align_lengths_valid_bytes_cuts_the_tail():
    s, t, g = align_lengths(np.array([1, 1, 1, 1]), np.array([2, 2]), valid_bytes=3)
    assert s.tolist() == [0, 0, -1, -1] and t.tolist() == [0, -1] and g == 1


def test_align_lengths_no_common_boundary_before_end():
    s, t, g = align_lengths(np.array([3, 3]), np.array([2, 2, 2]))
    assert s.tolist() == [0, 0] and t.tolist() == [0, 0, 0] and g == 1


def test_align_lengths_empty():
    s, t, g = align_lengths(np.array([], dtype=np.int64), np.array([2]))
    assert s.tolist() == [] and t.tolist() == [-1] and g == 0


# -- real pairs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_pair_invariants_on_hard_texts(student, teacher):
    for text in HARD_TEXTS:
        alignment, *rest = align_text(student, teacher, text)
        assert invariant_violations(alignment, *rest, text) == [], (student, teacher, text)


def test_golden_groups_sentencepiece_vs_byte_level():
    alignment, s_ids, t_ids, *_ = align_text("pkg:mistral-sp-v1", "pkg:deepseek-v3", "Hello world, 😀 中文")
    s_tokens = tok("pkg:mistral-sp-v1").convert_ids_to_tokens(s_ids)
    t_tokens = tok("pkg:deepseek-v3").convert_ids_to_tokens(t_ids)
    assert s_tokens == ["▁Hello", "▁world", ",", "▁", "😀", "▁", "中", "文"]
    assert t_tokens == ["Hello", "Ġworld", ",", "ĠðŁĺ", "Ģ", "Ġ", "ä¸Ńæĸĩ"]
    # "Hello" | " world" | "," | " 😀" (2 vs 2 tokens) | " " | "中文" (2 vs 1)
    assert alignment.student_group_ids.tolist() == [0, 1, 2, 3, 3, 4, 5, 5]
    assert alignment.teacher_group_ids.tolist() == [0, 1, 2, 3, 3, 4, 5]
    assert alignment.num_groups == 6 and alignment.status == STATUS_OK


def test_golden_leading_space_with_dummy_prefix():
    # sentencepiece writes " lead" as ["▁", "▁lead"]: the first "▁" is the dummy prefix, so it has no bytes
    alignment, s_ids, t_ids, *_ = align_text("pkg:mistral-sp-v1", "pkg:cl100k", " lead")
    assert tok("pkg:mistral-sp-v1").convert_ids_to_tokens(s_ids) == ["▁", "▁lead"]
    assert alignment.student_group_ids.tolist() == [-1, 0]
    assert alignment.teacher_group_ids.tolist() == [0]
    assert alignment.excluded_student_tokens == 0  # a 0-byte token is not counted as excluded


@pytest.mark.parametrize("name", ["pkg:qwen", "pkg:mistral-sp-v1", "pkg:smollm2"])
def test_identical_tokenizers_give_one_group_per_token(name):
    text = "Start " + HARD_TEXTS[1] + HARD_TEXTS[6]  # starts with a word: no bare dummy-prefix token
    alignment, s_ids, *_ = align_text(name, name, text)
    assert alignment.num_groups == len(s_ids)
    assert alignment.student_group_ids.tolist() == list(range(len(s_ids)))
    assert alignment.teacher_group_ids.tolist() == list(range(len(s_ids)))


def test_special_tokens_get_minus_one():
    qwen = tok("pkg:qwen")
    eot = qwen.convert_tokens_to_ids("<|im_end|>")
    ids = encode_completion(qwen, "Hi there") + [eot]
    other = encode_completion(tok("pkg:cl100k"), "Hi there")
    alignment = align_completion(ids, other, byte_table(qwen), byte_table(tok("pkg:cl100k")), "Hi there")
    assert alignment.student_group_ids[-1] == -1 and alignment.status == STATUS_OK
    assert alignment.excluded_student_tokens == 0


def test_mismatch_excludes_the_tail_and_never_merges_it():
    # teacher spells "Hello wurld, and more text": every token after the first differing byte is -1
    s_tok, t_tok = tok("pkg:qwen"), tok("pkg:cl100k")
    s_ids = encode_completion(s_tok, "Hello world, and more text")
    t_ids = encode_completion(t_tok, "Hello wurld, and more text")
    alignment = align_completion(s_ids, t_ids, byte_table(s_tok), byte_table(t_tok))
    assert alignment.status == STATUS_MISMATCH
    assert alignment.student_group_ids.tolist() == [0, -1, -1, -1, -1, -1]
    assert alignment.teacher_group_ids[0] == 0 and np.all(alignment.teacher_group_ids[1:] == -1)
    assert alignment.excluded_student_tokens == 5 and alignment.num_groups == 1


def test_text_changed_by_a_normalizer_is_detected():
    # both tokenizations agree with each other but not with the text (as after a lowercasing normalizer)
    s_tok, t_tok = tok("pkg:qwen"), tok("pkg:cl100k")
    s_ids, t_ids = encode_completion(s_tok, "abc def"), encode_completion(t_tok, "abc def")
    alignment = align_completion(s_ids, t_ids, byte_table(s_tok), byte_table(t_tok), text="abc DEF")
    assert alignment.status == STATUS_MISMATCH
    assert alignment.student_group_ids.tolist() == [0, -1]


def test_invalid_utf8_tail_is_excluded():
    # a sampled completion that stops inside a 4-byte emoji: byte-level tokens carry partial characters
    s_tok, t_tok = tok("pkg:smollm2"), tok("pkg:deepseek-v3")
    s_table, t_table = byte_table(s_tok), byte_table(t_tok)
    full = encode_completion(s_tok, "ok 😀")
    data = decode_bytes(s_table, full)
    # find a prefix of the student ids that ends mid-character
    cut = next(k for k in range(1, len(full)) if 0 < len(data) - len(decode_bytes(s_table, full[:k])) < 4)
    ids = full[:cut]
    text, valid = completion_text_from_ids(s_table, ids)
    assert text == "ok " and valid == 3
    alignment = align_completion(ids, ids_from(t_tok, ids, s_table), s_table, t_table)
    assert alignment.status == STATUS_INVALID_UTF8_TAIL
    assert alignment.student_group_ids[-1] == -1 and alignment.excluded_student_tokens >= 1
    # on-policy: the teacher tokenizes only the valid text; the student's partial character is still the reason
    t_ids = encode_completion(t_tok, text)
    alignment = align_completion(ids, t_ids, s_table, t_table, text)
    assert alignment.status == STATUS_INVALID_UTF8_TAIL and alignment.student_group_ids[-1] == -1
    assert alignment.matched_bytes <= 3 and alignment.num_groups >= 1
    assert decode_bytes(t_table, t_ids) == b"ok "


def ids_from(t_tok, s_ids, s_table):
    """Teacher ids spelling the same (partial) bytes: byte-level tokens of the raw bytes."""
    data = decode_bytes(s_table, s_ids)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    enc = bytes_to_unicode()
    return [t_tok.convert_tokens_to_ids(enc[b]) for b in data]


def test_smollm2_drops_unencodable_control_byte_is_a_detected_mismatch():
    # SmolLM2's byte-level vocabulary has no token for byte 0x1D: its tokenizer silently drops it
    text = "ab\x1dcd ef"
    alignment, s_ids, t_ids, s_table, t_table = align_text("pkg:smollm2", "pkg:qwen", text)
    assert decode_bytes(s_table, s_ids) == b"abcd ef"
    assert alignment.status == STATUS_MISMATCH
    assert alignment.student_group_ids.tolist()[0] == 0 and alignment.num_groups == 1
    assert np.all(alignment.student_group_ids[1:] == -1) and alignment.excluded_student_tokens >= 1


def test_completion_text_from_ids_valid_text():
    s_tok = tok("pkg:mistral-sp-v1")
    ids = encode_completion(s_tok, "héllo 中")
    assert completion_text_from_ids(byte_table(s_tok), ids) == ("héllo 中", len("héllo 中".encode()))


def test_group_ids_have_int32_dtype_and_lengths():
    alignment, s_ids, t_ids, *_ = align_text("pkg:qwen", "pkg:cl100k", "dtype check")
    assert alignment.student_group_ids.dtype == np.int32 and alignment.teacher_group_ids.dtype == np.int32
    assert len(alignment.student_group_ids) == len(s_ids) and len(alignment.teacher_group_ids) == len(t_ids)


# -- property tests -----------------------------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=48)


@pytest.mark.parametrize("student,teacher", PAIRS[:3] + PAIRS[4:])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_property_random_unicode_pairs(student, teacher, text):
    alignment, *rest = align_text(student, teacher, text)
    assert invariant_violations(alignment, *rest, text) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_property_random_unicode_gemma_pair(text):
    alignment, *rest = align_text("pkg:gemma3", "pkg:smollm2", text)
    assert invariant_violations(alignment, *rest, text) == []


# -- batch = one by one -----------------------------------------------------------------------------------------


def same(a, b) -> bool:
    return (
        a.status == b.status
        and a.num_groups == b.num_groups
        and np.array_equal(a.student_group_ids, b.student_group_ids)
        and np.array_equal(a.teacher_group_ids, b.teacher_group_ids)
        and (a.excluded_student_tokens, a.excluded_teacher_tokens, a.matched_bytes, a.total_bytes)
        == (b.excluded_student_tokens, b.excluded_teacher_tokens, b.matched_bytes, b.total_bytes)
    )


@pytest.mark.parametrize("student,teacher", [("pkg:qwen", "pkg:cl100k"), ("pkg:mistral-sp-v1", "pkg:deepseek-v3")])
def test_align_batch_equals_align_completion(student, teacher):
    s_tok, t_tok = tok(student), tok(teacher)
    s_table, t_table = byte_table(s_tok), byte_table(t_tok)
    texts = HARD_TEXTS + [""]
    s_rows = [encode_completion(s_tok, x) for x in texts]
    t_rows = [encode_completion(t_tok, x) for x in texts]
    # a mismatching row, a row with trailing special tokens, a row cut inside a character
    texts.append("Hello world foo")
    s_rows.append(encode_completion(s_tok, "Hello world foo"))
    t_rows.append(encode_completion(t_tok, "Hello wurld foo"))
    texts.append("ab")
    s_rows.append(encode_completion(s_tok, "ab") + [s_tok.eos_token_id])
    t_rows.append(encode_completion(t_tok, "ab") + [t_tok.eos_token_id])
    emoji = encode_completion(s_tok, "x 😀")
    texts.append(None)
    s_rows.append(emoji[:-1])
    t_rows.append(encode_completion(t_tok, "x "))
    with_text = align_batch(s_rows, t_rows, s_table, t_table, texts)
    without = align_batch(s_rows, t_rows, s_table, t_table)
    for row, text in enumerate(texts):
        assert same(with_text[row], align_completion(s_rows[row], t_rows[row], s_table, t_table, text)), row
        assert same(without[row], align_completion(s_rows[row], t_rows[row], s_table, t_table)), row


def test_align_batch_rejects_mismatched_row_counts():
    table = byte_table(tok("pkg:qwen"))
    with pytest.raises(ValueError, match="one of each per completion"):
        align_batch([[1]], [], table, table)
