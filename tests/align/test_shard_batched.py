"""process_shard (batched: one alignment over the shard, Arrow columns from flat arrays) against the per-row
reference (align_example + a per-row count + rows_to_table for each row): the same Parquet bytes and the same stats,
on real packaged tokenizers, with mismatching rows, empty completions, special-token text, max_length policies,
invalid rows and a shard that mixes teacher-cache rows with fresh ones."""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from gold_pipeline.align.config import AlignConfig
from gold_pipeline.align.job import _run_shards
from gold_pipeline.align.row import OverlongRow, align_example
from gold_pipeline.align.shard import _nest, process_shard, rows_to_table
from gold_pipeline.data.records import Example
from gold_pipeline.data.sources import iter_parsed
from gold_pipeline.errors import InvalidRow, InvalidRowError
from gold_pipeline.text.encode import encode_completion, render_prompt_ids
from gold_pipeline.text.pair import TokenizerSpec, load_side

COMPLETIONS = [
    "Hello, world!",
    "",
    " one leading space",
    "   leading spaces and trailing   ",
    "👍🏽 thumbs, 👩🏾‍💻 coder — 中文字符测试，日本語のテキスト、한국어 문장。",
    "def f(x: int) -> int:\n    \"\"\"Square.\"\"\"\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    "<|im_end|> <s> </s> [INST] <start_of_turn> literal special text",
    "control byte ab\x1dcd ef here",  # pkg:smollm2 has no token for 0x1D and drops it: a detected mismatch
    "e\u0301 a\u0308 n\u0303 — combining marks; ÀÉÎÕÜ ﬁ ῼ\n" * 8,
    "x",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-01-31 " * 20,
]
PAIRS = [("pkg:cl100k", "pkg:deepseek-v3"), ("pkg:mistral-sp-v1", "pkg:deepseek-v3"),
         ("pkg:deepseek-v3", "pkg:mistral-sp-v1"), ("pkg:smollm2", "pkg:gemma3")]


def _dataset(tmp_path) -> str:
    path = tmp_path / "data.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(COMPLETIONS):
            messages = [{"role": "user", "content": f"Question {i} <|im_start|>?"},
                        {"role": "assistant", "content": text}]
            if i % 3 == 0:
                messages.insert(0, {"role": "system", "content": "Be brief."})
            f.write(json.dumps({"messages": messages}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")  # invalid row
    return str(path)


def _count_row(counts: Counter, row) -> None:
    """The stats of one aligned row, counted row by row (the reference for align.shard.table_stats)."""
    counts[("rows",)] += 1
    counts[("groups",)] += row["num_groups"]
    counts[("truncated_rows",)] += int(row["truncated"])
    counts[("completion_bytes",)] += len(row["completion_text"].encode("utf-8"))
    counts[("rows_by_status", row["status"])] += 1
    counts[("rows_with_teacher_topk",)] += int(row["teacher_topk_ids"] is not None)
    for side in ("student", "teacher"):
        groups = row[f"{side}_group_ids"]
        sizes = np.bincount(groups[groups >= 0], minlength=row["num_groups"])  # (G,) tokens per group
        excluded = int(row[f"excluded_{side}_tokens"])
        counts[(side, "prompt_tokens")] += len(row[f"{side}_prompt_ids"])
        counts[(side, "completion_tokens")] += len(row[f"{side}_completion_ids"])
        counts[(side, "grouped_tokens")] += int(sizes.sum())
        counts[(side, "multi_token_groups")] += int((sizes > 1).sum())
        counts[(side, "excluded_tokens")] += excluded
        counts[(side, "zero_byte_tokens")] += int((groups < 0).sum()) - excluded


def _reference(items, student, teacher, cfg):
    """The per-row path process_shard replaced (each row tokenized and aligned on its own)."""
    counts, rows = Counter(), []
    for item in items:
        counts[("source_rows",)] += 1
        if isinstance(item, InvalidRow):
            counts[("invalid", item.reason)] += 1
            continue
        try:
            row = align_example(item, student, teacher, cfg.max_length, overlong=cfg.overlong)
        except OverlongRow:
            counts[("skipped", "too_long")] += 1
            continue
        _count_row(counts, row)
        rows.append(row)
    return rows_to_table(rows), _nest(counts)


class _NoWriter:
    def is_done(self, index: int) -> bool:
        raise AssertionError("an invalid row must stop the job before any shard")


def _parquet(table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


@pytest.mark.parametrize("student_name,teacher_name", PAIRS)
@pytest.mark.parametrize("max_length,overlong", [(None, "truncate"), (60, "truncate"), (60, "skip")])
def test_batched_shard_equals_the_per_row_reference(tmp_path, student_name, teacher_name, max_length, overlong):
    student = load_side(TokenizerSpec(student_name, None, None))
    teacher = load_side(TokenizerSpec(teacher_name, None, None))
    data = _dataset(tmp_path)
    cfg = AlignConfig(out=str(tmp_path / "out"), dataset=data, student_tokenizer=student_name,
                      teacher_tokenizer=teacher_name, max_length=max_length, overlong=overlong, skip_invalid=True)
    items = list(iter_parsed(data))
    assert any(isinstance(item, InvalidRow) for item in items)
    expected_table, expected_stats = _reference(items, student, teacher, cfg)
    for threads in (1, 2):
        table, stats = process_shard(items, student, teacher, cfg, threads=threads)
        assert table.equals(expected_table)
        assert _parquet(table) == _parquet(expected_table)
        assert stats == expected_stats
    if student_name == "pkg:smollm2":
        assert expected_stats["rows_by_status"]["mismatch"] == 1
    if max_length is None:
        assert expected_table.num_rows == sum(isinstance(item, Example) for item in items)
    with pytest.raises(InvalidRowError):  # the job refuses invalid rows before a shard is built
        _run_shards(iter(items), replace(cfg, skip_invalid=False, shard_size=len(items)), _NoWriter(), None, None)


def test_shard_mixing_teacher_cache_rows_and_fresh_rows_keeps_source_order(tmp_path):
    # not what the readers yield (a source is all cache or all dataset), but process_shard must stay correct
    student = load_side(TokenizerSpec("pkg:mistral-sp-v1", None, None))
    teacher = load_side(TokenizerSpec("pkg:deepseek-v3", None, None))
    data = _dataset(tmp_path)
    examples = [item for item in iter_parsed(data) if isinstance(item, Example)]
    items = []
    for k, example in enumerate(examples):
        if k % 2:
            ids = encode_completion(teacher.tokenizer, example.completion_text) + teacher.eot_ids.tolist()
            extra = {"teacher_completion_ids": np.asarray(ids, dtype=np.int32), "finish_reason": "stop",
                     "teacher_prompt_ids": np.asarray(render_prompt_ids(teacher.tokenizer, example.prompt_messages)),
                     "teacher_token_logprobs": np.full(len(ids), -1.0, dtype=np.float32),
                     "teacher_topk_ids": np.zeros((len(ids), 2), dtype=np.int32),
                     "teacher_topk_logprobs": np.full((len(ids), 2), -2.0, dtype=np.float16)}  # fmt: skip
            example = replace(example, extra=extra)
        items.append(example)
    cfg = AlignConfig(out=str(tmp_path / "out"), dataset=data, student_tokenizer="pkg:mistral-sp-v1",
                      teacher_tokenizer="pkg:deepseek-v3")
    expected_table, expected_stats = _reference(items, student, teacher, cfg)
    table, stats = process_shard(items, student, teacher, cfg)
    assert table["row_index"].to_pylist() == [example.row_index for example in items]
    assert table.equals(expected_table) and _parquet(table) == _parquet(expected_table)
    assert stats == expected_stats and stats["rows_with_teacher_topk"] == len(items) // 2


def test_completion_the_tokenizer_refuses_is_an_error_naming_the_row(tmp_path):
    # a lone surrogate (valid JSON "\ud800") cannot be passed to the Rust tokenizer
    path = tmp_path / "surrogate.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]}
            for text in ("fine", "bad \ud800 half", "fine too")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    from gold_pipeline.align.job import run_align
    from gold_pipeline.errors import GoldInputError

    with pytest.raises(GoldInputError, match=r"^Row 1: its completion cannot be tokenized"):
        run_align(AlignConfig(out=str(tmp_path / "out"), dataset=str(path), student_tokenizer="pkg:qwen",
                              teacher_tokenizer="pkg:cl100k", progress=False))
