"""TRL's GOLD script command line runs unchanged as `gold train` (and `python -m gold_pipeline.scripts.gold`):
ScriptArguments / ModelConfig / every GOLDConfig field as --field_name, TRL's YAML layout, gold's dashed aliases,
refusals with the closest valid name, and --push_to_hub refused before training when the Hub is unreachable."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from gold_pipeline.cli.main import app
from gold_pipeline.training import job as job_module
from tests.helpers import CONVERSATIONS, STUDENT_TOKENIZER, TEACHER_TOKENIZER, tiny_model, tokenizer


def _save(tmp_path, name, seed):
    path = tmp_path / name.replace("pkg:", "")
    tiny_model(name, seed).save_pretrained(str(path))
    tokenizer(name).save_pretrained(str(path))
    return str(path)


def _data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    return str(path)


@pytest.fixture
def captured(monkeypatch):
    """Replace the training run by a recorder of the (TrainJob, GOLDConfig) the command resolved."""
    calls = []

    def fake_run(job, args):
        calls.append((job, args))
        return {"global_step": 0, "training_loss": 0.0, "output_dir": args.output_dir}

    monkeypatch.setattr(job_module, "run_train_job", fake_run)
    return calls


def test_trl_gold_script_command_trains_and_saves_a_student_with_a_card(tmp_path):
    from transformers import AutoModelForCausalLM

    student, teacher, data = _save(tmp_path, STUDENT_TOKENIZER, 0), _save(tmp_path, TEACHER_TOKENIZER, 1), _data(tmp_path)
    out = tmp_path / "gold-model"
    # TRL's own example command (trl/experimental/gold/gold.py), small numbers, tiny local models, no hub push
    result = CliRunner().invoke(app, [
        "train", "--model_name_or_path", student, "--teacher_model_name_or_path", teacher, "--dataset_name", data,
        "--learning_rate", "2e-5", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--output_dir", str(out), "--num_train_epochs", "1", "--max_steps", "2",
        "--max_completion_length", "12", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu",
    ])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    AutoModelForCausalLM.from_pretrained(str(out))
    resolved = json.loads((out / "gold_train_config.json").read_text())
    assert resolved["job"]["student"] == student and resolved["job"]["dataset"] == data
    assert resolved["args"]["learning_rate"] == 2e-5 and resolved["args"]["teacher_model_name_or_path"] == teacher
    # a cross-tokenizer pair without --use_uld_loss (as TRL's example writes it) gets ULD, and says so
    assert resolved["args"]["use_uld_loss"] is True and "use_uld_loss=True" in result.output
    card = (out / "README.md").read_text()
    assert f"`{student}`" in card and f"`{teacher}`" in card
    assert "ULD" in card and "| lmbda | 0.5 |" in card and "| learning_rate | 2e-05 |" in card
    from gold_pipeline.data.shards import file_sha256

    assert file_sha256(data) in card  # the data fingerprint
    assert "| train_loss |" in card and "| last_logged_step | 2 |" in card


def test_trl_yaml_config_resolves_like_the_flags_and_like_golds_aliases(tmp_path, captured, monkeypatch):
    monkeypatch.setenv("GOLD_TEST_FROM_ENV", "no")  # restored (unset) after the test; the file sets "yes"
    flags = ["--model_name_or_path", "pkg:smollm2", "--teacher_model_name_or_path", "pkg:smollm2",
             "--dataset_name", "rows.jsonl", "--learning_rate", "2e-5", "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "8", "--output_dir", str(tmp_path / "run"), "--num_train_epochs", "1",
             "--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--no_disable_dropout", "--bf16", "false",
             "--dtype", "float32", "--eval_strategy", "steps", "--eval_steps", "5", "--dataset_test_split", "dev",
             "--use_cpu"]
    config = {
        "env": {"GOLD_TEST_FROM_ENV": "yes"},
        "model_name_or_path": "pkg:smollm2", "teacher_model_name_or_path": "pkg:smollm2",
        "dataset_name": "rows.jsonl", "learning_rate": "2e-5",  # YAML 1.1 reads 2e-5 as a string, TRL as a float
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 8, "output_dir": str(tmp_path / "run"),
        "num_train_epochs": 1, "use_peft": True, "lora_target_modules": ["q_proj", "v_proj"],
        "disable_dropout": False, "bf16": "false", "dtype": "float32", "eval_strategy": "steps", "eval_steps": 5,
        "dataset_test_split": "dev", "use_cpu": True,
    }
    path = tmp_path / "gold.yaml"
    path.write_text(yaml.safe_dump(config))
    gold_style = ["--student", "pkg:smollm2", "--teacher", "pkg:smollm2", "--dataset", "rows.jsonl",
                  "--learning-rate", "2e-5", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps",
                  "8", "--output-dir", str(tmp_path / "run"), "--num-train-epochs", "1", "--use-peft",
                  "--lora-target-modules", "q_proj", "v_proj", "--no-disable-dropout", "--bf16", "false",
                  "--dtype", "float32", "--eval-steps", "5", "--eval-dataset", "rows.jsonl", "--eval-split", "dev",
                  "--use-cpu"]
    for argv in (flags, ["--config", str(path)], gold_style):
        result = CliRunner().invoke(app, ["train", *argv])
        assert result.exit_code == 0, result.output
    import os

    assert os.environ["GOLD_TEST_FROM_ENV"] == "yes"  # TRL's `env:` mapping
    (job_a, args_a), (job_b, args_b), (job_c, args_c) = captured
    assert job_a == job_b == job_c
    assert job_a.eval_dataset == "rows.jsonl" and job_a.eval_split == "dev"  # dataset_test_split -> eval set
    assert args_a.to_dict() == args_b.to_dict() == args_c.to_dict()
    assert args_a.learning_rate == 2e-5 and args_a.lora_target_modules == ["q_proj", "v_proj"]
    assert args_a.model_init_kwargs == args_a.teacher_model_init_kwargs == {"dtype": "float32"}
    assert args_a.disable_dropout is False and args_a.use_peft is True


def test_python_m_script_is_gold_train(tmp_path, captured):
    from gold_pipeline.scripts.gold import main

    argv = ["--model_name_or_path", "pkg:smollm2", "--dataset_name", "rows.jsonl", "--max_steps", "3",
            "--output_dir", str(tmp_path / "run"), "--use_cpu"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert CliRunner().invoke(app, ["train", *argv]).exit_code == 0
    (job_a, args_a), (job_b, args_b) = captured
    assert job_a == job_b and args_a.to_dict() == args_b.to_dict() and args_a.max_steps == 3


def test_unknown_flag_is_refused_with_the_closest_name(tmp_path, capsys):
    result = CliRunner().invoke(app, ["train", "--model_name_or_path", "x", "--dataset_name", "y.jsonl",
                                      "--lerning_rate", "1e-3"])
    assert result.exit_code == 2
    assert "unknown option --lerning_rate; did you mean --learning_rate?" in result.output
    path = tmp_path / "train.yaml"
    path.write_text("model_name_or_path: x\ndataset_name: y.jsonl\nlamda: 0.5\n")
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2
    assert "unknown option --lamda; did you mean --lmbda?" in result.output
    from gold_pipeline.scripts.gold import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", "x", "--datset_name", "y.jsonl"])
    assert exit_info.value.code == 2
    assert "did you mean --dataset_name?" in capsys.readouterr().err


def test_options_gold_cannot_honour_are_refused(tmp_path):
    base = ["train", "--model_name_or_path", "x", "--dataset_name", "y.jsonl", "--output_dir", str(tmp_path)]
    result = CliRunner().invoke(app, [*base, "--packing"])
    assert result.exit_code == 2 and "packing=True is not supported" in result.output
    result = CliRunner().invoke(app, [*base, "--load_in_4bit", "--use_peft"])  # this machine has no CUDA GPU
    assert result.exit_code == 2 and "bitsandbytes" in result.output and "CUDA" in result.output
    result = CliRunner().invoke(app, [*base, "--max_steps", "3", "--max-steps", "4"])
    assert result.exit_code == 2 and "max_steps is given twice" in result.output


def test_push_to_hub_without_a_reachable_hub_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    student, teacher, data = _save(tmp_path, STUDENT_TOKENIZER, 0), _save(tmp_path, TEACHER_TOKENIZER, 1), _data(tmp_path)
    out = tmp_path / "gold-model"
    result = CliRunner().invoke(app, [
        "train", "--model_name_or_path", student, "--teacher_model_name_or_path", teacher, "--dataset_name", data,
        "--output_dir", str(out), "--max_steps", "2", "--use_uld_loss", "--use_cpu", "--push_to_hub",
    ])
    assert result.exit_code == 2, result.output
    assert "--push_to_hub needs the Hugging Face Hub" in result.output and "offline" in result.output
    assert not out.exists()  # nothing trained, no checkpoint written


def test_cross_tokenizer_pair_with_use_uld_loss_false_is_still_refused(tmp_path):
    student, teacher, data = _save(tmp_path, STUDENT_TOKENIZER, 0), _save(tmp_path, TEACHER_TOKENIZER, 1), _data(tmp_path)
    result = CliRunner().invoke(app, [
        "train", "--model_name_or_path", student, "--teacher_model_name_or_path", teacher, "--dataset_name", data,
        "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--use_uld_loss", "false", "--use_cpu",
        "--report_to", "none",
    ])
    assert result.exit_code == 2 and "tokenizers differ" in result.output
