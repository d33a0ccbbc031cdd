"""`gold train`: options from a YAML config file (command line wins), local model directories, raw
conversations aligned on the fly, TensorBoard + jsonl metrics, the saved student, and refusals."""

import json

import yaml
from typer.testing import CliRunner

from gold_pipeline.cli.main import app
from tests.helpers import CONVERSATIONS, STUDENT_TOKENIZER, TEACHER_TOKENIZER, tiny_model, tokenizer


def _save(tmp_path, name, seed):
    path = tmp_path / name.replace("pkg:", "")
    tiny_model(name, seed).save_pretrained(str(path))
    tokenizer(name).save_pretrained(str(path))
    return str(path)


def test_train_from_a_config_file(tmp_path):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    config = {
        "student": _save(tmp_path, STUDENT_TOKENIZER, 0),
        "teacher": _save(tmp_path, TEACHER_TOKENIZER, 1),
        "dataset": str(data),
        "output_dir": str(tmp_path / "run"),
        "use_uld_loss": True,
        "uld_use_hybrid_loss": True,
        "lmbda": 0.5,
        "max_steps": 5,  # overridden on the command line below
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_completion_length": 12,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": ["tensorboard"],
        "use_cpu": True,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", "--config", str(path), "--max-steps", "2", "--set", "seed=3"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert list(run.rglob("events.out.tfevents.*")), "TensorBoard events missing"
    resolved = json.loads((run / "gold_train_config.json").read_text())
    assert resolved["args"]["seed"] == 3 and resolved["args"]["max_steps"] == 2
    AutoModelForCausalLM.from_pretrained(str(run))


def test_unknown_option_in_config_file_is_refused(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"student": "x", "dataset": "y.jsonl", "lamda": 0.5}))
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2
    assert "lamda" in result.output


def test_invalid_field_value_names_the_field(tmp_path):
    result = CliRunner().invoke(app, ["train", "--student", "x", "--dataset", "y.jsonl", "--lmbda", "2",
                                      "--output-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "lmbda" in result.output
