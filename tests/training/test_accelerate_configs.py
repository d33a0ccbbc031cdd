"""configs/accelerate/*.yaml load through accelerate's own launcher code (the config file -> launch arguments ->
environment) and build the FSDP / DeepSpeed plugins that accelerate builds at run time, with the settings that keep
the frozen teacher replicated (docs/scaling.md)."""

import json
import os
from pathlib import Path
from unittest import mock

from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "accelerate"


def _launch_args(name: str):
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    return args, defaults, mixed_precision_from_config


def _accelerate_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_fsdp2_config_builds_an_fsdp2_plugin_with_a_replicated_teacher():
    args, _, _ = _launch_args("fsdp2.yaml")
    assert args.use_fsdp and args.num_processes == 2
    env = _accelerate_env(prepare_multi_gpu_env(args))
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading is False  # with True ranks > 0 would load the teacher on meta
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)  # save_pretrained layout on rank 0


def test_deepspeed_zero3_config_builds_a_zero3_plugin_with_a_replicated_teacher(monkeypatch):
    monkeypatch.chdir(REPO)  # the yaml names configs/deepspeed/zero3.json relative to the repository
    args, defaults, mixed_precision_from_config = _launch_args("deepspeed_zero3.yaml")
    assert args.use_deepspeed and not mixed_precision_from_config
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as `accelerate launch`
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, _accelerate_env(env)):
        plugin = DeepSpeedPlugin()  # validates the yaml against the JSON (refuses keys set in both)
    assert plugin.zero_stage == 3 and plugin.hf_ds_config.is_zero3()
    assert plugin.zero3_init_flag is False  # with True from_pretrained would partition the teacher too
    config = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # save_pretrained
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # the batch comes from GOLDConfig
