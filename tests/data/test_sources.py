"""Row readers: formats, validation errors naming row and field, skip counts, streaming, teacher caches."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gold_pipeline import errors
from gold_pipeline.data import records, shards, sources
from gold_pipeline.data.records import Example
from gold_pipeline.data.sources import iter_examples
from gold_pipeline.errors import InvalidRowError
from tests.helpers import DEMO_DATA

DEMO_DIR = DEMO_DATA


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def _chat(user, answer, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def test_messages_prompt_completion_and_plain_strings(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [
        _chat("2+2?", "4", system="Be brief."),
        {"prompt": "3+3?", "completion": "6"},
        {"prompt": [{"role": "user", "content": "5+5?"}], "completion": [{"role": "assistant", "content": "10"}]},
    ])
    examples = list(iter_examples(path))
    assert [e.row_index for e in examples] == [0, 1, 2]
    assert examples[0].prompt_messages == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "2+2?"}]
    assert [e.completion_text for e in examples] == ["4", "6", "10"]
    assert examples[1].prompt_messages == [{"role": "user", "content": "3+3?"}]
    assert examples[1].sample_id == shards.sample_id("3+3?")


def test_prompt_only_rows_when_completion_not_required(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "yo"}])
    examples = list(iter_examples(path, require_completion=False))
    assert [e.completion_text for e in examples] == [None, None]
    assert examples[0].prompt_messages == [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRowError, match=r"Row 0 \(p.jsonl line 1\): field `messages` has no assistant turn"):
        list(iter_examples(path))


def test_repeated_prompts_get_distinct_sample_ids(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [_chat("q", "a1"), _chat("q", "a2"), _chat("other", "b")])
    examples = list(iter_examples(path))
    assert [e.generation_index for e in examples] == [0, 1, 0]
    assert examples[1].sample_id == shards.sample_id(examples[0].prompt_messages, 1)
    assert len({e.sample_id for e in examples}) == 3


BAD_ROWS = [
    ("not json at all", "invalid_json", "<line>"),
    ([1, 2], "not_an_object", "<row>"),
    ({"text": "hello"}, "no_messages", "messages"),
    ({"messages": "user: hi"}, "messages_not_a_list", "messages"),
    ({"messages": []}, "empty_messages", "messages"),
    ({"messages": ["hi"]}, "message_not_an_object", "messages[0]"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "bad_role", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]},
     "non_string_content", "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     "non_string_content", "messages[1].content"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn", "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages_after_assistant", "messages"),
    ({"messages": [{"role": "assistant", "content": "b"}]}, "empty_prompt", "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     "empty_completion", "messages[1].content"),
    ({"prompt": "a", "completion": ""}, "empty_completion", "completion"),
    ({"prompt": "", "completion": "b"}, "empty_prompt", "prompt"),
    ({"prompt": 7, "completion": "b"}, "wrong_type", "prompt"),
    ({"prompt": "a", "completion": {"text": "b"}}, "wrong_type", "completion"),
    ({"prompt": "a"}, "no_completion", "completion"),
    ({"prompt": "a", "completion": [{"role": "user", "content": "b"}]},
     "completion_not_one_assistant_turn", "completion"),
]


@pytest.mark.parametrize("record,reason,field", BAD_ROWS, ids=[r[1] + "-" + r[2] for r in BAD_ROWS])
def test_bad_row_error_names_row_field_and_fix(tmp_path, record, reason, field):
    path = _jsonl(tmp_path / "d.jsonl", [_chat("fine", "ok"), _chat("fine 2", "ok"), record])
    with pytest.raises(InvalidRowError) as caught:
        list(iter_examples(path))
    message = str(caught.value)
    assert message.startswith("Row 2 (d.jsonl line 3): field `" + field + "`")
    assert records.INVALID_REASONS[reason][1] in message and "--skip-invalid" in message
    assert caught.value.invalid.reason == reason and caught.value.invalid.row_index == 2


def test_skip_invalid_counts_every_reason_and_keeps_row_indices(tmp_path):
    rows = [_chat("a", "1")] + [record for record, _, _ in BAD_ROWS] + [_chat("b", "2")]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    counts: dict[str, int] = {}
    examples = list(iter_examples(path, skip_invalid=True, invalid_counts=counts))
    assert [e.row_index for e in examples] == [0, len(rows) - 1]
    expected: dict[str, int] = {}
    for _, reason, _ in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    assert counts == expected and sum(counts.values()) == len(BAD_ROWS)


def test_invalid_utf8_line_names_file_and_line_and_can_be_skipped(tmp_path):
    # regression: a byte 0xff in a jsonl stopped `gold align` with only "'utf-8' codec can't decode byte 0xff in
    # position 42" (no file, no line) and --skip-invalid could not skip it
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(_chat("q", "a")).encode()
    path.write_bytes(good + b"\n" + good[:20] + b"\xff" + good[20:] + b"\n" + good + b"\n")
    with pytest.raises(InvalidRowError, match=r"Row 1 \(mixed.jsonl line 2\).*not valid UTF-8.*--skip-invalid") as caught:
        list(iter_examples(str(path)))
    assert caught.value.invalid.reason == "invalid_utf8"
    counts: dict[str, int] = {}
    kept = list(iter_examples(str(path), skip_invalid=True, invalid_counts=counts))
    assert [e.row_index for e in kept] == [0, 2] and counts == {"invalid_utf8": 1}


def test_reading_is_lazy(tmp_path):
    """The first rows come out before later (bad) lines are read: nothing is materialized up front."""
    path = _jsonl(tmp_path / "d.jsonl", [_chat("a", "1")] + ["{broken"] * 3)
    first = next(iter_examples(path))
    assert first.completion_text == "1"


def test_parquet_json_array_glob_and_split(tmp_path):
    rows = [_chat("a", "1"), _chat("b", "2")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    _jsonl(tmp_path / "x1.jsonl", rows[:1])
    _jsonl(tmp_path / "x2.jsonl", rows[1:])
    for dataset in (tmp_path / "d.parquet", tmp_path / "d.json", tmp_path / "x*.jsonl"):
        examples = list(iter_examples(str(dataset)))
        assert [(e.row_index, e.completion_text) for e in examples] == [(0, "1"), (1, "2")], dataset
    with pytest.raises(errors.GoldInputError, match="only the 'train' split"):
        list(iter_examples(str(tmp_path / "d.parquet"), split="test"))
    with pytest.raises(errors.GoldInputError, match="No file matches"):
        list(iter_examples(str(tmp_path / "nothing*.jsonl")))


def test_pretty_printed_json_object_is_refused_with_the_fix(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"data": [_chat("a", "1")]}, indent=2))
    with pytest.raises(errors.GoldInputError, match="one JSON object .*JSON array of rows or JSON lines"):
        list(iter_examples(str(tmp_path / "d.json")))


def test_data_folder_goes_through_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "folder"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [_chat("a", "1"), {"prompt": "b", "completion": "2"}])
    examples = list(iter_examples(str(folder)))
    assert [e.completion_text for e in examples] == ["1", "2"]
    assert sources.dataset_fingerprint(str(folder))["kind"] == "folder"
    (tmp_path / "d.csv").write_text('prompt,completion\n"2+2?",4\nhi,hello\n')
    examples = list(iter_examples(str(tmp_path / "d.csv")))  # .csv goes through datasets' csv builder
    assert [(e.prompt_messages[0]["content"], e.completion_text) for e in examples] == [("2+2?", "4"), ("hi", "hello")]


def test_unknown_dataset_error_says_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(errors.GoldInputError, match="looked up as a hub dataset id"):
        list(iter_examples("no-such-user/no-such-dataset"))


def test_demo_dataset_is_valid():
    examples = list(iter_examples(str(DEMO_DIR / "train.jsonl")))
    assert 40 <= len(examples) <= 60
    assert len({e.sample_id for e in examples}) == len(examples)
    text = "".join(e.completion_text for e in examples)
    assert "```python" in text and "答案" in text and "👍🏽" in text
    prompts = list(iter_examples(str(DEMO_DIR / "prompts.jsonl"), require_completion=False))
    assert prompts and all(e.completion_text is None for e in prompts)


def write_teacher_cache(out, rows_per_shard, k=3):
    """A tiny teacher cache written with the shared ShardWriter (the contract TEACHER writes to)."""
    out = shards.prepare_output_dir(out, resume=False, overwrite=False)
    writer = shards.ShardWriter(out, kind="teacher")
    for index, rows in enumerate(rows_per_shard):
        table_rows = []
        for row_index, (prompt, text, ids) in enumerate(rows):
            m = len(ids)
            table_rows.append({
                "sample_id": shards.sample_id(prompt), "row_index": row_index, "generation_index": 0,
                "messages": [{"role": "user", "content": prompt}], "prompt_text": None, "completion_text": text,
                "teacher_prompt_ids": [1, 2, 3], "teacher_completion_ids": ids,
                "teacher_token_logprobs": [-0.5] * m,
                "teacher_topk_ids": [[t] + [0] * (k - 1) for t in ids],
                "teacher_topk_logprobs": [[-0.5] + [-3.0] * (k - 1)] * m,
                "finish_reason": "stop",
            })
        writer.write_shard(index, table_rows)
    writer.write_manifest(config={"teacher": "tiny"}, fingerprints={"teacher_tokenizer": {"sha256": "f"}})
    return out


def test_teacher_cache_is_a_source_with_topk_arrays(tmp_path):
    shard_rows = [[("p0", "a", [5, 6]), ("p1", "bc", [7])], [("p2", "d", [8, 9, 10])]]
    cache = write_teacher_cache(tmp_path / "cache", shard_rows)
    assert sources.is_teacher_cache(cache) and not sources.is_teacher_cache(tmp_path)
    examples = list(iter_examples(str(cache)))
    assert [e.row_index for e in examples] == [0, 1, 2]
    assert [e.completion_text for e in examples] == ["a", "bc", "d"]
    last = examples[2].extra
    assert last["teacher_completion_ids"].tolist() == [8, 9, 10]
    assert last["teacher_topk_ids"].shape == (3, 3) and last["teacher_topk_ids"][:, 0].tolist() == [8, 9, 10]
    assert last["teacher_topk_logprobs"].dtype == np.float16
    assert last["finish_reason"] == "stop"
    assert sources.dataset_fingerprint(str(cache))["kind"] == "teacher_cache"


def test_unfinished_teacher_cache_is_refused(tmp_path):
    cache = write_teacher_cache(tmp_path / "cache", [[("p0", "a", [5])]])
    (cache / "manifest.json").unlink()
    with pytest.raises(errors.ManifestError, match="--resume"):
        list(sources.iter_teacher_cache(cache))


def test_example_defaults():
    example = Example("id", [{"role": "user", "content": "q"}], "a", 0)
    assert example.generation_index == 0 and example.extra == {}
