"""training/trl_args.py: TRL's names map onto gold's TrainJob keys and GOLDConfig fields."""

import dataclasses
import warnings

import pytest

from gold_pipeline.errors import GoldInputError
from gold_pipeline.training import trl_args
from gold_pipeline.training.trl_args import Runtime, parse_argv, to_gold_options


def _trl():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import ModelConfig, ScriptArguments
        from trl.experimental.gold.gold_config import GOLDConfig as TrlGOLDConfig
    return ScriptArguments, ModelConfig, TrlGOLDConfig


def _defaults(cls):
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls) if f.init}


def test_every_trl_gold_script_field_is_an_option():
    script, model, config = _trl()
    names = set(trl_args.option_names())
    for cls in (script, model, config):
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f"--{f.name}" not in names]
        assert missing == [], f"{cls.__name__}: {missing}"


def test_trl_only_fields_keep_trls_defaults():
    script, model, config = _trl()
    trl = {**_defaults(script), **_defaults(model), **_defaults(config)}
    ours = {**_defaults(trl_args.TrlScriptArguments), **_defaults(trl_args.TrlModelArguments),
            **_defaults(trl_args.TrlSftArguments)}
    ours.pop("dtype")  # None = the checkpoint's own dtype, gold's default (TRL: float32); only an explicit one is used
    assert {k: v for k, v in ours.items() if trl[k] != v} == {}


def test_dataset_test_split_is_the_eval_set_only_when_evaluating():
    options = {"model_name_or_path": "s", "dataset_name": "d.jsonl", "dataset_test_split": "dev"}
    assert "eval_dataset" not in to_gold_options(options)
    gold = to_gold_options({**options, "eval_strategy": "steps"})
    assert (gold["student"], gold["dataset"], gold["eval_dataset"], gold["eval_split"]) == ("s", "d.jsonl",
                                                                                             "d.jsonl", "dev")
    gold = to_gold_options({**options, "eval_steps": 10})  # gold's rule: --eval-steps alone turns evaluation on
    assert gold["eval_strategy"] == "steps" and gold["eval_split"] == "dev"


def test_an_aligned_folder_as_dataset_name_is_aligned_training_data():
    gold = to_gold_options({"dataset_name": "data/aligned"}, aligned=lambda path: True)
    assert gold["aligned"] == "data/aligned" and "dataset" not in gold
    with pytest.raises(GoldInputError, match="--eval_aligned"):
        to_gold_options({"dataset_name": "data/aligned", "eval_strategy": "steps"}, aligned=lambda path: True)


def test_model_options_go_into_both_models_init_kwargs():
    gold = to_gold_options(parse_argv(["--dtype", "bfloat16", "--attn_implementation", "eager",
                                       "--trust_remote_code", "--model_init_kwargs", '{"dtype": "float16"}']))
    assert gold["model_init_kwargs"] == {"dtype": "float16", "attn_implementation": "eager",
                                         "trust_remote_code": True}  # explicit init kwargs win
    assert gold["teacher_model_init_kwargs"] == {"dtype": "bfloat16", "attn_implementation": "eager",
                                                 "trust_remote_code": True}
    with pytest.raises(GoldInputError, match="Unknown dtype"):
        to_gold_options({"dtype": "float8"})


def test_4bit_loading_where_it_can_run():
    gpu = Runtime(cuda=True, bitsandbytes=True, local_process_index=1)
    gold = to_gold_options({"load_in_4bit": True, "use_peft": True, "dtype": "bfloat16"}, runtime=gpu)
    kwargs = gold["model_init_kwargs"]
    assert kwargs["device_map"] == {"": 1} and kwargs["dtype"] == "bfloat16"
    assert kwargs["quantization_config"]["load_in_4bit"] is True
    assert kwargs["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert "quantization_config" not in gold.get("teacher_model_init_kwargs", {})
    with pytest.raises(GoldInputError, match="needs --use_peft"):
        to_gold_options({"load_in_8bit": True}, runtime=gpu)
    with pytest.raises(GoldInputError, match="lacks a CUDA GPU and bitsandbytes"):
        to_gold_options({"load_in_4bit": True, "use_peft": True}, runtime=Runtime(cuda=False, bitsandbytes=False))


def test_file_values_are_typed_like_the_command_line():
    assert trl_args.typed_value("learning_rate", "2e-5", "f.yaml") == 2e-5
    assert trl_args.typed_value("bf16", "true", "f.yaml") is True
    assert trl_args.typed_value("lora_target_modules", "q_proj", "f.yaml") == ["q_proj"]
    with pytest.raises(GoldInputError, match="f.yaml: lmbda='high'"):
        trl_args.typed_value("lmbda", "high", "f.yaml")
