"""`gold inspect`: numbers recomputed from the shards agree with the manifest; frequent multi-token groups are
shown as text with both tokenizations; JSON output; teacher-cache folders."""

import ast
import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from gold_pipeline.align.config import AlignConfig
from gold_pipeline.align.job import run_align
from gold_pipeline.cli.main import app
from gold_pipeline.data import shards
from gold_pipeline.recipes.inspect import inspect_output, render_report
from tests.helpers import DEMO_DATA

runner = CliRunner()
DEMO_DIR = DEMO_DATA


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "aligned"
    run_align(AlignConfig(out=str(out), dataset=str(DEMO_DIR / "train.jsonl"), student_tokenizer="pkg:mistral-sp-v1",
                          teacher_tokenizer="pkg:deepseek-v3", shard_size=20, progress=False))
    return out


def test_report_matches_manifest_and_polars(aligned):
    report = inspect_output(aligned)
    stats = shards.read_manifest(aligned)["stats"]
    frame = pl.read_parquet(str(aligned / "*.parquet"))
    assert report["rows"] == stats["rows"] == frame.height
    assert report["groups"] == stats["groups"] == frame["num_groups"].sum()
    for side in ("student", "teacher"):
        assert report[side]["completion_tokens"] == stats[side]["completion_tokens"]
        assert report[side]["prompt_tokens"] == stats[side]["prompt_tokens"]
        assert report[side]["multi_token_groups"] == stats[side]["multi_token_groups"]
        assert report[side]["multi_token_group_share"] == pytest.approx(
            stats["derived"][f"{side}_multi_token_group_share"])
    # mistral-sp splits digits one by one, deepseek keeps up to 3: far more multi-token groups on the student side
    assert report["student"]["multi_token_group_share"] > report["teacher"]["multi_token_group_share"]
    assert report["rows_by_status"] == {"ok": report["rows"]} and report["rows_with_mismatch"] == 0
    assert report["vocab_map"]["pairs"] == stats["vocab_map"]["pairs"]
    assert 0 < report["vocab_map"]["student_share"] <= 1


def test_frequent_groups_shown_as_text_with_both_tokenizations(aligned):
    report = inspect_output(aligned, top=5)
    top = report["top_multi_token_groups"]
    assert len(top) == 5 and report["notes"] == []
    assert [entry["count"] for entry in top] == sorted((entry["count"] for entry in top), reverse=True)
    for entry in top:
        assert len(entry["student_ids"]) > 1 or len(entry["teacher_ids"]) > 1
        joined = lambda pieces: "".join(ast.literal_eval(piece) for piece in pieces)  # noqa: E731 (str reprs)
        assert joined(entry["student_pieces"]) == joined(entry["teacher_pieces"]) == entry["text"]
    # the counts are real: the most frequent group occurs that often in the stored rows
    frame = pl.read_parquet(str(aligned / "*.parquet"))
    first = top[0]
    occurrences = 0
    for ids, groups in zip(frame["student_completion_ids"].to_list(), frame["student_group_ids"].to_list()):
        ids, groups = np.array(ids), np.array(groups)
        for group in np.unique(groups[groups >= 0]):
            occurrences += ids[groups == group].tolist() == first["student_ids"]
    assert occurrences >= first["count"]
    text = render_report(report)
    assert "share of multi-token groups" in text and repr(first["text"]) in text and "vocab map" in text


def test_cli_inspect_text_json_and_no_tokenizers(aligned):
    result = runner.invoke(app, ["inspect", str(aligned)])
    assert result.exit_code == 0, result.output
    assert "rows in" in result.output and "most frequent multi-token groups" in result.output
    as_json = runner.invoke(app, ["inspect", str(aligned), "--json", "--no-tokenizers", "--top", "3"])
    report = json.loads(as_json.output)
    assert report["rows"] == 52 and len(report["top_multi_token_groups"]) == 3
    assert "text" not in report["top_multi_token_groups"][0] and "--no-tokenizers" in report["notes"][0]


def test_cli_inspect_refuses_unfinished_output(tmp_path):
    shards.prepare_output_dir(tmp_path / "half", resume=False, overwrite=False)
    result = runner.invoke(app, ["inspect", str(tmp_path / "half")])
    assert result.exit_code == 2 and "--resume" in result.output and "Traceback" not in result.output


def test_inspect_teacher_cache(tmp_path):
    writer = shards.ShardWriter(shards.prepare_output_dir(tmp_path / "t", resume=False, overwrite=False),
                                kind="teacher")
    row = {"sample_id": "s", "row_index": 0, "generation_index": 0, "messages": [{"role": "user", "content": "q"}],
           "prompt_text": None, "completion_text": "ab", "teacher_prompt_ids": [1], "teacher_completion_ids": [5, 6],
           "teacher_token_logprobs": [-1.0, -2.0], "teacher_topk_ids": [[5, 1], [6, 1]],
           "teacher_topk_logprobs": [[-1.0, -2.0], [-2.0, -3.0]], "finish_reason": "stop"}
    writer.write_shard(0, [row, row | {"sample_id": "t", "finish_reason": "length"}])
    writer.write_manifest(config={}, fingerprints={"teacher_tokenizer": {"name": "pkg:x", "sha256": "0"}})
    report = inspect_output(tmp_path / "t")
    assert report["kind"] == "teacher" and report["rows"] == 2 and report["teacher_tokens"] == 4
    assert report["topk_k"] == [2] and report["finish_reasons"] == {"stop": 1, "length": 1}
    assert report["bytes_per_teacher_token"] > 0
    assert "teacher cache" in render_report(report)


def test_dummy_prefix_group_at_completion_start_is_not_a_mismatch_note(tmp_path):
    """Regression: a SentencePiece student's first completion token carries the dummy-prefix space
    (b' Notebooks' against the byte-level teacher's b'Notebooks'); gold inspect reported that the tokenizers
    'do not reproduce the stored groups'. The space is no text: the group's pieces agree without it."""
    out = tmp_path / "aligned"
    run_align(AlignConfig(out=str(out), dataset=str(DEMO_DIR / "train.jsonl"), student_tokenizer="pkg:mistral-sp-v1",
                          teacher_tokenizer="pkg:smollm2", shard_size=64, progress=False))
    report = inspect_output(out, top=400)
    assert report["notes"] == [] and len(report["top_multi_token_groups"]) > 20
