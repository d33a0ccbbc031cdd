"""`gold inspect`: numbers recomputed from the shards agree with the manifest; frequent multi-token groups are
shown as text with both tokenizations; JSON output; teacher-cache folders."""

import ast
import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from gold_pipeline.align.config import PROJECTION_FILE, AlignConfig
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


def _numeral_strings(tokenizer, marker: str) -> dict[int, str]:
    """id -> text of the tokenizer's numeral tokens, read from its own vocabulary strings (independent of the byte
    tables): digits after at most one leading-space marker ("Ġ" byte-level, "▁" SentencePiece), and the
    SentencePiece byte-fallback pieces <0x30>..<0x39> (one digit byte each)."""
    found = {}
    for piece, token_id in tokenizer.get_vocab().items():
        if token_id in tokenizer.all_special_ids:
            continue
        if len(piece) == 6 and piece.startswith("<0x3") and piece[4] in "0123456789" and piece[5] == ">":
            found[token_id] = piece[4]
            continue
        text = piece[1:] if piece[:1] == marker else piece
        if text and all("0" <= c <= "9" for c in text):
            found[token_id] = (" " if piece[:1] == marker else "") + text
    return found


def _occurrences(aligned, ids: set[int]) -> tuple[int, int]:
    """(student completion tokens whose id is in `ids`, all of them) in the stored rows, read with polars."""
    flat = pl.read_parquet(str(aligned / "*.parquet"))["student_completion_ids"].explode()
    return int(flat.is_in(list(ids)).sum()), flat.len()


def test_projection_coverage_of_numerals_sentencepiece_student(aligned, tok):
    """mistral-sp-v1 has 20 numeral tokens: "0".."9" and the byte-fallback pieces <0x30>..<0x39> (same bytes); the
    vocab map pairs only the first with DeepSeek's "0".."9" (matched), the byte pieces are projected onto the same
    one teacher digit: all 20 covered, half matched."""
    student, teacher = tok("pkg:mistral-sp-v1"), tok("pkg:deepseek-v3")
    numerals = _numeral_strings(student, "▁")
    teacher_numerals = set(_numeral_strings(teacher, "Ġ").values())
    assert len(numerals) == 20
    matched = sum(text in teacher_numerals for token_id, text in numerals.items()
                  if not student.convert_ids_to_tokens(token_id).startswith("<0x"))
    assert matched == 10
    projection = inspect_output(aligned)["projection"]
    assert projection["present"] and projection["numeral_tokens"] == 20
    assert projection["numeral_share"] == 1.0 and projection["numeral_matched_share"] == matched / 20 == 0.5
    frame = pl.read_parquet(str(aligned / PROJECTION_FILE))
    covered_ids = set(frame.filter(pl.col("kind").is_in(["matched", "projected"]))["student_id"].to_list())
    assert projection["rows"] == frame.height
    assert projection["token_share"] == len(covered_ids) / frame.height
    assert projection["kinds"] == dict(frame.group_by("kind").len().iter_rows())
    # weighed by occurrence in the stored completions (special tokens have no row: not counted)
    occurrence = projection["by_occurrence"]
    covered_n, _ = _occurrences(aligned, covered_ids)
    text_n, _ = _occurrences(aligned, set(frame["student_id"].to_list()))
    numeral_n, _ = _occurrences(aligned, set(numerals))
    assert numeral_n > 0 and occurrence["numeral_tokens"] == numeral_n and occurrence["numeral_share"] == 1.0
    assert occurrence["completion_tokens_with_bytes"] == text_n
    assert occurrence["token_share"] == covered_n / text_n
    # the manifest's coverage (written by gold align) says the same
    recorded = shards.read_manifest(aligned)["stats"]["projection"]["coverage"]
    assert recorded["numeral_tokens"] == projection["numeral_share"]
    assert recorded["tokens"] == pytest.approx(projection["token_share"])
    text = render_report(inspect_output(aligned))
    assert "100.00% of numeral tokens (matched alone 50.00%" in text and "by occurrence" in text


def test_projection_coverage_multi_digit_student_and_json(tmp_path, tok):
    """cl100k (every 1- to 3-digit numeral is one token: 1110) as the student, SmolLM2 (one digit per token) as the
    teacher: only "0".."9" are matched, all 1110 covered; the arithmetic rows' numerals all count as covered."""
    source = tmp_path / "rows.jsonl"
    pairs = ((123, 456), (17, 5), (999, 1))
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]} for a, b in pairs]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "aligned"
    run_align(AlignConfig(out=str(out), dataset=str(source), student_tokenizer="pkg:cl100k",
                          teacher_tokenizer="pkg:smollm2", progress=False))
    numerals = _numeral_strings(tok("pkg:cl100k"), "Ġ")
    expected = {str(n) for n in range(1000)} | {f"{n:02d}" for n in range(100)} | {f"{n:03d}" for n in range(1000)}
    assert set(numerals.values()) == expected and len(numerals) == 1110
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    projection = json.loads(result.output)["projection"]
    assert projection["numeral_tokens"] == 1110 and projection["covered_numeral_tokens"] == 1110
    assert projection["numeral_matched_share"] == 10 / 1110
    # completions: "123 + 456 = 579.", "17 + 5 = 22.", "999 + 1 = 1000." -> numeral tokens 3 + 3 + 4 ("100","0")
    assert projection["by_occurrence"]["numeral_tokens"] == 10 and projection["by_occurrence"]["numeral_share"] == 1.0
    text = runner.invoke(app, ["inspect", str(out)]).output
    assert "100.00% of numeral tokens (matched alone 0.90%" in text


def test_missing_projection_table_is_a_note_not_an_error(aligned, tmp_path):
    """Outputs written before projection tables existed have no vocab_map/projection.parquet."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(aligned, old)
    (old / PROJECTION_FILE).unlink()
    report = inspect_output(old, load_tokenizers=False)
    assert report["projection"]["present"] is False and "rerun `gold align`" in report["projection"]["note"]
    result = runner.invoke(app, ["inspect", str(old), "--no-tokenizers"])
    assert result.exit_code == 0 and "no projection table" in result.output and "gold align" in result.output


def test_projection_numerals_from_manifest_without_tokenizers(aligned):
    projection = inspect_output(aligned, load_tokenizers=False)["projection"]
    assert projection["numeral_source"].startswith("manifest") and projection["numeral_share"] == 1.0
    assert "numeral_share" not in projection["by_occurrence"] and projection["by_occurrence"]["token_share"] > 0.5
