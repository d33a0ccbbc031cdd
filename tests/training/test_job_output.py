"""`gold train`'s output folder belongs to one run, and its raw datasets are read through data.sources."""

from __future__ import annotations

import json

import pytest

from gold_pipeline.errors import InvalidRowError, OutputExistsError
from gold_pipeline.training.job import CONFIG_FILE, _raw_dataset, prepare_train_output
from gold_pipeline.training.metrics import JsonlMetricsCallback


def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path):
    # regression: `gold train` trained into a folder holding an earlier run, mixing both
    out = tmp_path / "run"
    prepare_train_output(out, resume=False, overwrite=False)  # nothing there: fine
    out.mkdir()
    (out / CONFIG_FILE).write_text("{}")
    (out / "checkpoint-2").mkdir()
    with pytest.raises(OutputExistsError, match="--resume-from-checkpoint latest.*--overwrite"):
        prepare_train_output(out, resume=False, overwrite=False)
    prepare_train_output(out, resume=True, overwrite=False)  # resuming keeps it
    assert (out / "checkpoint-2").is_dir()
    prepare_train_output(out, resume=False, overwrite=True)
    assert list(out.iterdir()) == []


def test_overwrite_never_deletes_a_folder_gold_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="holds no gold run"):
        prepare_train_output(out, resume=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"


class _State:
    def __init__(self, step: int):
        self.global_step, self.epoch, self.is_world_process_zero = step, 0.0, True


def test_metrics_file_holds_one_run(tmp_path):
    # regression: metrics.jsonl was appended to, so two runs in one folder mixed their logs
    path = tmp_path / "metrics.jsonl"
    callback = JsonlMetricsCallback(path)
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    callback.on_train_begin(None, _State(0), None)
    assert path.read_text() == ""
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    callback.on_train_begin(None, _State(2), None)  # resumed at step 2: its logs up to step 2 stay
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    callback.on_log(None, _State(3), None, logs={"loss": 0.5})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_gold_train_dataset_is_validated_like_gold_align(tmp_path):
    # regression: `gold train --dataset` read files with datasets.load_dataset, so a row `gold align` refuses
    # (an empty completion) trained silently
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": "hi", "completion": "yo"}, {"prompt": "hi again", "completion": ""}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with pytest.raises(InvalidRowError, match=r"Row 1 \(rows.jsonl line 2\).*completion"):
        _raw_dataset(str(data), "train")
    data.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    [example] = _raw_dataset(str(data), "train")
    assert example.completion_text == "yo" and example.prompt_messages == [{"role": "user", "content": "hi"}]
