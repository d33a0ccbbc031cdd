"""`run_align` end to end on the shipped demo data with real packaged tokenizers (mistral-sp-v1 student,
deepseek-v3 teacher): shard layout, per-row invariants, both chat templates, max-length policies, invalid rows,
teacher caches as the source, resume."""

import json
import shutil

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gold_pipeline import errors
from gold_pipeline.align.config import AlignConfig
from gold_pipeline.align.job import run_align
from gold_pipeline.align.row import align_example
from gold_pipeline.align.shard import rows_to_table
from gold_pipeline.data import shards
from gold_pipeline.data.schemas import ALIGNED_SCHEMA, VOCAB_MAP_SCHEMA
from gold_pipeline.data.sources import iter_examples
from gold_pipeline.errors import InvalidRowError
from gold_pipeline.text.pair import TokenizerSpec, load_side
from tests.helpers import DEMO_DATA

DEMO = str(DEMO_DATA / "train.jsonl")
STUDENT, TEACHER = "pkg:mistral-sp-v1", "pkg:deepseek-v3"


def _cfg(out, **overrides):
    options = dict(out=str(out), dataset=DEMO, student_tokenizer=STUDENT, teacher_tokenizer=TEACHER, shard_size=16,
                   progress=False)
    options.update(overrides)
    return AlignConfig(**options)


@pytest.fixture(scope="module")
def sides():
    return load_side(TokenizerSpec(STUDENT, None, None)), load_side(TokenizerSpec(TEACHER, None, None))


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("aligned") / "demo"
    run_align(_cfg(out))
    return out


def _rows(out):
    return pl.read_parquet(str(out / "*.parquet")).sort("row_index")


def _group_bytes(table, ids, groups):
    """{group: bytes} of one side (dummy prefix of the first token removed by completion_byte_lengths)."""
    from gold_pipeline.text.bytes import completion_byte_lengths

    lengths = completion_byte_lengths(table, np.asarray(ids))
    out: dict[int, bytes] = {}
    for token_id, group, length in zip(ids, groups, lengths):
        if group >= 0:
            token = table.token_bytes[token_id]
            out[group] = out.get(group, b"") + token[len(token) - length:]
    return out


def test_demo_output_layout_manifest_and_stats(demo_out):
    manifest = shards.read_manifest(demo_out, kind="aligned")
    examples = list(iter_examples(DEMO))
    assert manifest["num_rows"] == len(examples) and manifest["num_shards"] == -(-len(examples) // 16)
    assert sorted(p.name for p in demo_out.glob("*.parquet")) == [shards.shard_name(i) for i in range(4)]
    assert [s["source_rows"] for s in manifest["shards"]] == [[0, 16], [16, 32], [32, 48], [48, len(examples)]]
    fingerprints = manifest["fingerprints"]
    assert fingerprints["student_tokenizer"]["name"] == STUDENT
    assert len(fingerprints["student_tokenizer"]["sha256"]) == 64
    assert fingerprints["teacher_tokenizer"]["chat_template_source"] in ("own", "default")
    assert fingerprints["dataset"]["files"][0]["sha256"] == shards.file_sha256(DEMO)
    stats = manifest["stats"]
    assert stats["rows"] == len(examples) and stats["rows_by_status"] == {"ok": len(examples)}
    assert stats["invalid"] == {} and stats["skipped"] == {}
    assert 0 < stats["derived"]["student_multi_token_group_share"] < 1
    assert manifest["config"]["overlong_policy"].startswith("none")
    vocab = pq.read_table(demo_out / manifest["files"]["vocab_map"])
    assert vocab.schema.equals(VOCAB_MAP_SCHEMA, check_metadata=False)
    assert vocab.num_rows == stats["vocab_map"]["pairs"] > 1000
    assert pq.read_schema(demo_out / "part-00000.parquet").equals(ALIGNED_SCHEMA, check_metadata=False)


def test_rows_are_byte_exact_partitions_with_end_of_turn(demo_out, sides):
    from gold_pipeline.text.encode import render_prompt_ids

    student, teacher = sides
    frame = _rows(demo_out)
    examples = {e.sample_id: e for e in iter_examples(DEMO)}
    for row in frame.iter_rows(named=True):
        example = examples[row["sample_id"]]
        assert row["completion_text"] == example.completion_text
        assert row["student_prompt_ids"] == render_prompt_ids(student.tokenizer, example.prompt_messages)
        assert row["teacher_prompt_ids"] == render_prompt_ids(teacher.tokenizer, example.prompt_messages)
        s_ids, t_ids = row["student_completion_ids"], row["teacher_completion_ids"]
        s_groups, t_groups = np.array(row["student_group_ids"]), np.array(row["teacher_group_ids"])
        assert len(s_ids) == len(s_groups) and len(t_ids) == len(t_groups)
        # both completions end with their side's end-of-turn ids, excluded from groups
        assert s_ids[-len(student.eot_ids):] == student.eot_ids.tolist()
        assert t_ids[-len(teacher.eot_ids):] == teacher.eot_ids.tolist()
        assert (s_groups[-len(student.eot_ids):] == -1).all() and (t_groups[-len(teacher.eot_ids):] == -1).all()
        # groups 0..G-1 appear in order on both sides and their bytes are equal; all text bytes covered
        for groups in (s_groups, t_groups):
            kept = groups[groups >= 0]
            assert (np.diff(kept) >= 0).all() and set(kept.tolist()) == set(range(row["num_groups"]))
        s_bytes = _group_bytes(student.table, s_ids, s_groups)
        t_bytes = _group_bytes(teacher.table, t_ids, t_groups)
        assert s_bytes == t_bytes
        assert b"".join(s_bytes[g] for g in range(row["num_groups"])) == example.completion_text.encode()
        assert row["status"] == "ok" and not row["truncated"] and row["teacher_topk_ids"] is None


def test_polars_reads_the_output_with_no_project_code(demo_out):
    frame = pl.scan_parquet(str(demo_out / "*.parquet")).select(
        pl.len().alias("rows"), pl.col("student_completion_ids").list.len().sum().alias("student_tokens")).collect()
    manifest = json.loads((demo_out / "manifest.json").read_text())
    assert frame["rows"][0] == manifest["num_rows"]
    assert frame["student_tokens"][0] == manifest["stats"]["student"]["completion_tokens"]


def test_parallel_workers_give_identical_shards(tmp_path):
    """Two spawned workers write the same shards as one process (a small pair keeps worker start-up short)."""
    options = dict(teacher_tokenizer=STUDENT, shard_size=7)
    run_align(_cfg(tmp_path / "one", **options))
    run_align(_cfg(tmp_path / "two", num_workers=2, **options))
    assert _rows(tmp_path / "two").equals(_rows(tmp_path / "one"))
    one, two = (shards.read_manifest(tmp_path / name) for name in ("one", "two"))
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert one["stats"]["rows"] == two["stats"]["rows"]


def test_existing_output_refused_and_resume_redoes_only_missing_shards(demo_out, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(demo_out, out)
    with pytest.raises(errors.OutputExistsError, match="--resume"):
        run_align(_cfg(out))
    # simulate a run killed after shard 1: shard 2 and 3 and the manifest are missing
    (out / "manifest.json").unlink()
    for index in (2, 3):
        (out / shards.shard_name(index)).unlink()
        (out / "_gold" / "done" / f"part-0000{index}.json").unlink()
    kept = (out / shards.shard_name(0)).stat().st_mtime_ns
    run_align(_cfg(out, resume=True))
    assert (out / shards.shard_name(0)).stat().st_mtime_ns == kept  # finished shard not rewritten
    assert _rows(out).equals(_rows(demo_out))
    with pytest.raises(errors.OutputExistsError, match="shard_size"):
        run_align(_cfg(out, resume=True, shard_size=8))


def test_max_length_truncate_cuts_at_a_common_group_boundary(tmp_path, sides):
    student, teacher = sides
    out = tmp_path / "cut"
    max_length = 80
    stats = run_align(_cfg(out, max_length=max_length))
    full = {e.sample_id: e for e in iter_examples(DEMO)}
    frame = _rows(out)
    assert stats["truncated_rows"] == int(frame["truncated"].sum()) > 0
    assert stats["rows"] + stats["skipped"].get("too_long", 0) == len(full)
    for row in frame.iter_rows(named=True):
        for side in ("student", "teacher"):
            assert len(row[f"{side}_prompt_ids"]) + len(row[f"{side}_completion_ids"]) <= max_length
        if not row["truncated"]:
            continue
        text = full[row["sample_id"]].completion_text
        assert text.startswith(row["completion_text"])  # equal when only the end-of-turn ids did not fit
        s_groups, t_groups = np.array(row["student_group_ids"]), np.array(row["teacher_group_ids"])
        # the cut ends with the last kept group on both sides: no end-of-turn ids after a cut
        assert s_groups[-1] == t_groups[-1] == row["num_groups"] - 1
        s_bytes = _group_bytes(student.table, row["student_completion_ids"], s_groups)
        assert s_bytes == _group_bytes(teacher.table, row["teacher_completion_ids"], t_groups)
        assert b"".join(s_bytes.values()) == row["completion_text"].encode()
    manifest = shards.read_manifest(out)
    assert manifest["config"]["overlong_policy"].startswith("truncate")


def test_max_length_skip_counts_rows(tmp_path):
    stats = run_align(_cfg(tmp_path / "skip", max_length=80, overlong="skip"))
    assert stats["skipped"]["too_long"] > 0 and stats["truncated_rows"] == 0
    assert stats["rows"] + stats["skipped"]["too_long"] == stats["source_rows"]


def test_invalid_rows_error_or_counted(tmp_path):
    rows = [line for line in open(DEMO, encoding="utf-8")][:5]
    rows.insert(2, json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    rows.insert(4, json.dumps({"prompt": "q", "completion": 5}) + "\n")
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(rows), encoding="utf-8")
    with pytest.raises(InvalidRowError, match=r"Row 2 \(bad.jsonl line 3\): field `messages` has no assistant"):
        run_align(_cfg(tmp_path / "a", dataset=str(data)))
    stats = run_align(_cfg(tmp_path / "b", dataset=str(data), skip_invalid=True, shard_size=3))
    assert stats["invalid"] == {"no_assistant_turn": 1, "wrong_type": 1}
    assert stats["rows"] == 5 and stats["source_rows"] == 7
    assert _rows(tmp_path / "b")["row_index"].to_list() == [0, 1, 3, 5, 6]


def test_serial_and_parallel_runs_refuse_the_same_invalid_row(tmp_path):
    # regression: the serial loop checked invalid rows inside process_shard, the parallel loop before submitting,
    # so the two runs could stop on different rows or leave different shards
    rows = [line for line in open(DEMO, encoding="utf-8")][:6]
    rows.insert(4, json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(rows), encoding="utf-8")
    messages = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        with pytest.raises(InvalidRowError) as caught:
            run_align(_cfg(out, dataset=str(data), shard_size=2, num_workers=workers))
        messages.append(str(caught.value))
        assert not (out / "manifest.json").exists()  # no finished-looking output
    assert messages[0] == messages[1] and "Row 4 (bad.jsonl line 5)" in messages[0]


def test_config_validation_sentences(tmp_path):
    with pytest.raises(ValueError, match="exactly one of --dataset or --teacher-cache"):
        AlignConfig(out="x", student_tokenizer=STUDENT, teacher_tokenizer=TEACHER)
    with pytest.raises(ValueError, match="--teacher-tokenizer is required"):
        AlignConfig(out="x", student_tokenizer=STUDENT, dataset=DEMO)
    with pytest.raises(ValueError, match="--overlong must be one of"):
        _cfg(tmp_path, overlong="drop")
    with pytest.raises(ValueError, match="--shard-size"):
        _cfg(tmp_path, shard_size=0)
    with pytest.raises(ValueError, match="is not a file"):
        _cfg(tmp_path, student_chat_template=str(tmp_path / "none.jinja"))
    with pytest.raises(ValueError, match="exclude each other"):
        _cfg(tmp_path, resume=True, overwrite=True)


def test_chat_template_file_is_used_and_recorded(tmp_path, sides):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}### assistant: {% endif %}", encoding="utf-8")
    data = tmp_path / "one.jsonl"
    data.write_text(open(DEMO, encoding="utf-8").readline(), encoding="utf-8")
    out = tmp_path / "tpl"
    run_align(_cfg(out, dataset=str(data), student_chat_template=str(template)))
    record = shards.read_manifest(out)["fingerprints"]["student_tokenizer"]
    assert record["chat_template_source"] == "file" and record["chat_template_file"] == str(template.resolve())
    prompt = sides[0].tokenizer.decode(_rows(out)["student_prompt_ids"][0].to_list())
    assert "### user:" in prompt and prompt.rstrip().endswith("### assistant:")


# ------------------------------------------------------------------------------------------------------------
# teacher cache as the source
# ------------------------------------------------------------------------------------------------------------


def _write_cache(out, teacher, examples, *, k=4, finish=None, fingerprint=None, char_split=False):
    """A teacher cache in the TEACHER_SCHEMA layout, made with the real teacher tokenizer (no model needed)."""
    from gold_pipeline.text.encode import encode_completion, render_prompt_ids
    from gold_pipeline.text.tokenizers import tokenizer_fingerprint

    out = shards.prepare_output_dir(out, resume=False, overwrite=False)
    writer = shards.ShardWriter(out, kind="teacher")
    rows = []
    rng = np.random.default_rng(0)
    for position, example in enumerate(examples):
        if char_split:  # a non-canonical tokenization: one text piece per character
            ids = [i for char in example.completion_text for i in encode_completion(teacher.tokenizer, char)]
        else:
            ids = encode_completion(teacher.tokenizer, example.completion_text)
        reason = (finish or {}).get(position, "stop")
        ids = ids + (teacher.eot_ids.tolist() if reason == "stop" else [])
        logprobs = np.sort(rng.normal(-3, 1, size=(len(ids), k)).astype(np.float16), axis=1)[:, ::-1]
        rows.append({
            "sample_id": example.sample_id, "row_index": example.row_index, "generation_index": 0,
            "messages": example.prompt_messages, "prompt_text": None, "completion_text": example.completion_text,
            "teacher_prompt_ids": render_prompt_ids(teacher.tokenizer, example.prompt_messages),
            "teacher_completion_ids": ids, "teacher_token_logprobs": logprobs[:, 0].astype(np.float32).tolist(),
            "teacher_topk_ids": [[i] + list(range(1, k)) for i in ids], "teacher_topk_logprobs": logprobs.tolist(),
            "finish_reason": reason,
        })
    writer.write_shard(0, rows)
    record = {"name": TEACHER, "revision": None,
              "sha256": fingerprint or tokenizer_fingerprint(teacher.tokenizer)}
    writer.write_manifest(config={"teacher": "test"}, fingerprints={"teacher_tokenizer": record})
    return out, rows


def test_teacher_cache_ids_and_topk_are_carried_over(tmp_path, sides):
    student, teacher = sides
    examples = list(iter_examples(DEMO))[:6]
    cache, cached_rows = _write_cache(tmp_path / "cache", teacher, examples, finish={1: "length"}, char_split=True)
    out = tmp_path / "from-cache"
    as_dataset = AlignConfig(out=str(out), dataset=str(cache), student_tokenizer=STUDENT)
    assert (as_dataset.dataset, as_dataset.teacher_cache) == (None, str(cache))  # read as a cache either way
    stats = run_align(AlignConfig(out=str(out), teacher_cache=str(cache), student_tokenizer=STUDENT, progress=False))
    manifest = shards.read_manifest(out)
    assert manifest["fingerprints"]["teacher_tokenizer"]["name"] == TEACHER  # taken from the cache's manifest
    assert manifest["fingerprints"]["dataset"]["kind"] == "teacher_cache"
    assert stats["rows_with_teacher_topk"] == 6 and stats["rows_by_status"] == {"ok": 6}
    frame = _rows(out)
    for row, cached in zip(frame.iter_rows(named=True), cached_rows):
        assert row["sample_id"] == cached["sample_id"]
        assert row["teacher_completion_ids"] == cached["teacher_completion_ids"]  # not re-tokenized
        assert row["teacher_prompt_ids"] == cached["teacher_prompt_ids"]
        assert row["teacher_topk_ids"] == cached["teacher_topk_ids"]
        np.testing.assert_array_equal(np.array(row["teacher_topk_logprobs"], dtype=np.float16),
                                      np.array(cached["teacher_topk_logprobs"], dtype=np.float16))
        assert row["finish_reason"] == cached["finish_reason"]
        s_groups, t_groups = np.array(row["student_group_ids"]), np.array(row["teacher_group_ids"])
        assert _group_bytes(student.table, row["student_completion_ids"], s_groups) == _group_bytes(
            teacher.table, row["teacher_completion_ids"], t_groups)
        has_eot = row["student_completion_ids"][-len(student.eot_ids):] == student.eot_ids.tolist()
        assert has_eot == (cached["finish_reason"] == "stop")  # the student learns to stop only where the teacher did
    assert frame.schema["teacher_topk_logprobs"] == pl.List(pl.List(pl.Float16))


def test_teacher_cache_truncation_cuts_topk_too(tmp_path, sides):
    _, teacher = sides
    examples = list(iter_examples(DEMO))[:4]
    cache, _ = _write_cache(tmp_path / "cache", teacher, examples)
    out = tmp_path / "cut"
    run_align(AlignConfig(out=str(out), teacher_cache=str(cache), student_tokenizer=STUDENT, max_length=70,
                          progress=False))
    for row in _rows(out).iter_rows(named=True):
        m = len(row["teacher_completion_ids"])
        assert len(row["teacher_topk_ids"]) == len(row["teacher_topk_logprobs"]) == len(
            row["teacher_token_logprobs"]) == m


def test_teacher_cache_with_another_tokenizer_is_refused(tmp_path, sides):
    _, teacher = sides
    cache, _ = _write_cache(tmp_path / "cache", teacher, list(iter_examples(DEMO))[:2], fingerprint="0" * 64)
    with pytest.raises(errors.ManifestError, match="does not match .*regenerate"):
        run_align(AlignConfig(out=str(tmp_path / "o"), teacher_cache=str(cache), student_tokenizer=STUDENT,
                              progress=False))


def test_align_example_and_rows_to_table_round_trip(sides):
    student, teacher = sides
    example = next(iter_examples(DEMO))
    row = align_example(example, student, teacher)
    table = rows_to_table([row, row])
    assert table.schema.equals(ALIGNED_SCHEMA) and table.num_rows == 2
    assert table.column("student_group_ids")[1].as_py() == row["student_group_ids"].tolist()
    assert table.column("teacher_topk_ids").null_count == 2
    assert isinstance(table.column("num_groups").type, pa.DataType)


