"""`gold align` as a user runs it: thin command, sentences instead of tracebacks, and a real killed
subprocess resumed with --resume giving exactly the rows of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
from typer.testing import CliRunner

from gold_pipeline import errors
from gold_pipeline.align.config import AlignConfig
from gold_pipeline.align.job import run_align
from gold_pipeline.cli.main import app
from gold_pipeline.data import shards
from tests.helpers import DEMO_DATA, REPO

DEMO = str(DEMO_DATA / "train.jsonl")
PAIR = ["--student-tokenizer", "pkg:mistral-sp-v1", "--teacher-tokenizer", "pkg:deepseek-v3"]
runner = CliRunner()


def _align(*args):
    return runner.invoke(app, ["align", *args])


def test_align_then_refuse_existing_output(tmp_path):
    out = tmp_path / "out"
    result = _align("--dataset", DEMO, *PAIR, "--out", str(out), "--shard-size", "20", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "wrote 52 rows" in result.output and f"gold inspect {out}" in result.output
    assert shards.read_manifest(out)["num_shards"] == 3
    again = _align("--dataset", DEMO, *PAIR, "--out", str(out), "--no-progress")
    assert again.exit_code == 2
    assert "already exists" in again.output and "--resume" in again.output and "Traceback" not in again.output
    overwritten = _align("--dataset", DEMO, *PAIR, "--out", str(out), "--overwrite", "--no-progress")
    assert overwritten.exit_code == 0 and shards.read_manifest(out)["num_shards"] == 1


def test_unknown_tokenizer_lists_packaged_names(tmp_path):
    result = _align("--dataset", DEMO, "--student-tokenizer", "pkg:nope", "--teacher-tokenizer", "pkg:deepseek-v3",
                    "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "pkg:nope" in result.output and "pkg:mistral-sp-v1" in result.output and "pkg:gemma3" in result.output
    assert not (tmp_path / "o").exists()  # nothing written before the inputs are known to be good


def test_bad_row_is_one_sentence_naming_row_and_field(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}\n')
    result = _align("--dataset", str(data), *PAIR, "--out", str(tmp_path / "o"), "--no-progress")
    assert result.exit_code == 2
    assert "Row 0 (bad.jsonl line 1): field `messages[1].content` is not a string" in result.output
    assert "--skip-invalid" in result.output and "Traceback" not in result.output
    skipped = _align("--dataset", str(data), *PAIR, "--out", str(tmp_path / "o2"), "--skip-invalid", "--no-progress")
    assert skipped.exit_code == 0 and "wrote 0 rows" in skipped.output
    assert shards.read_manifest(tmp_path / "o2")["stats"]["invalid"] == {"non_string_content": 1}


def test_missing_source_and_bad_policy_are_refused(tmp_path):
    result = _align(*PAIR, "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "exactly one of --dataset or --teacher-cache" in result.output
    result = _align("--dataset", DEMO, *PAIR, "--out", str(tmp_path / "o"), "--overlong", "drop")
    assert result.exit_code == 2 and "--overlong must be one of" in result.output


def test_resume_after_killing_a_real_subprocess_gives_the_uninterrupted_rows(tmp_path):
    shard_size = 4
    reference = tmp_path / "reference"
    run_align(AlignConfig(out=str(reference), dataset=DEMO, student_tokenizer="pkg:mistral-sp-v1",
                          teacher_tokenizer="pkg:deepseek-v3", shard_size=shard_size, progress=False))
    out = tmp_path / "killed"
    env = dict(os.environ, GOLD_ALIGN_TEST_SHARD_DELAY="0.3", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "gold_pipeline.cli", "align", "--dataset", DEMO, *PAIR, "--out", str(out),
               "--shard-size", str(shard_size), "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marker = out / "_gold" / "done" / "part-00001.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stdout.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in out.glob("*.parquet"))
    assert not (out / "manifest.json").exists() and 2 <= len(finished) < 13
    with pytest.raises(errors.ManifestError, match="--resume"):
        shards.read_manifest(out)
    result = _align("--dataset", DEMO, *PAIR, "--out", str(out), "--shard-size", str(shard_size), "--resume",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    resumed = pl.read_parquet(str(out / "*.parquet"))
    expected = pl.read_parquet(str(reference / "*.parquet"))
    assert resumed.equals(expected)  # same rows, same order: none lost, none duplicated
    assert resumed["sample_id"].n_unique() == resumed.height == 52
    assert [s["sha256"] for s in shards.read_manifest(out)["shards"]] == [
        s["sha256"] for s in shards.read_manifest(reference)["shards"]]
