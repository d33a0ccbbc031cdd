"""text.pair: the one owner of a side's stop / pad / end-of-turn ids and of the manifest tokenizer record."""

from __future__ import annotations

import numpy as np

from gold_pipeline.text.pair import TokenizerPair, TokenizerSide, pad_token_id, stop_token_ids, tokenizer_record
from tests.helpers import tok

RECORD_KEYS = {"name", "revision", "sha256", "vocab_size", "chat_template_source", "chat_template_file",
               "chat_template_sha256", "end_of_turn_ids"}


def test_stop_ids_are_the_first_end_of_turn_id_then_eos():
    tokenizer = tok("pkg:smollm2")
    side = TokenizerSide.of(tokenizer)
    assert list(side.stop_ids) == stop_token_ids(tokenizer)
    assert side.stop_ids[0] == int(side.eot_ids[0])
    assert tokenizer.eos_token_id in side.stop_ids
    assert len(set(side.stop_ids)) == len(side.stop_ids)


def test_pad_id_falls_back_to_eos_then_zero():
    class Fake:
        pad_token_id = None
        eos_token_id = [7, 8]

    assert pad_token_id(Fake()) == 7
    Fake.eos_token_id = None
    assert pad_token_id(Fake()) == 0
    real = tok("pkg:smollm2")
    assert pad_token_id(real) == (real.pad_token_id if real.pad_token_id is not None else real.eos_token_id)


def test_teacher_cache_and_align_write_one_tokenizer_record_layout():
    # regression: the teacher cache wrote its own {name, sha256, revision, chat_template_source} record
    from gold_pipeline.teacher_cache import TeacherCacheConfig
    from gold_pipeline.teacher_cache.job import fingerprints_for

    side = TokenizerSide.of(tok("pkg:smollm2"))
    assert set(tokenizer_record("pkg:smollm2", None, side)) == RECORD_KEYS
    cfg = TeacherCacheConfig(dataset=__file__, teacher="pkg:smollm2-135m-instruct", teacher_tokenizer="pkg:smollm2",
                             out="unused")
    record = fingerprints_for(cfg, tok("pkg:smollm2"))["teacher_tokenizer"]
    assert set(record) == RECORD_KEYS and record["sha256"] == tokenizer_record("pkg:smollm2", None, side)["sha256"]


def test_pair_of_one_tokenizer_shares_its_side():
    tokenizer = tok("pkg:mistral-sp-v1")
    pair = TokenizerPair.build(tokenizer, tokenizer)
    assert pair.same_tokenizer and pair.student is pair.teacher
    assert pair.student_eot_ids == pair.teacher_eot_ids and pair.side("teacher") is pair.teacher


def test_end_of_turn_pair_is_the_merged_column_of_each_side():
    pair = TokenizerPair.build(tok("pkg:cl100k"), tok("pkg:qwen"))  # <|endoftext|> (no template) ↔ <|im_end|>
    assert pair.end_of_turn_pair().tolist() == [[pair.student_eot_ids[0], pair.teacher_eot_ids[0]]]

    def side(eot):
        return TokenizerSide(tokenizer=None, table=None, eot_ids=np.asarray(eot, dtype=np.int32), stop_ids=(),
                             pad_id=0)

    multi = TokenizerPair(side([7, 8]), side([3]), same_tokenizer=False)
    assert multi.end_of_turn_pair("first").tolist() == [[7, 3]]  # the first id carries the group's joint mass
    assert multi.end_of_turn_pair("last").tolist() == [[8, 3]]
    assert TokenizerPair(side([]), side([3]), False).end_of_turn_pair().shape == (0, 2)
