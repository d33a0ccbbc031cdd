"""GOLDConfig: TRL's field names and defaults, the merge-strategy mapping, validation errors naming the field."""

import dataclasses

import pytest

from gold_pipeline.training import GOLDConfig

# The fields the seed lists (TRL 1.16 GOLDConfig); our defaults must equal TRL's.
TRL_FIELDS = [
    "temperature", "top_p", "top_k", "lmbda", "beta", "max_completion_length", "teacher_model_name_or_path",
    "teacher_model_revision", "teacher_model_init_kwargs", "teacher_tokenizer_name_or_path", "disable_dropout",
    "seq_kd", "num_generations", "use_uld_loss", "uld_crossentropy_weight", "uld_distillation_weight",
    "uld_student_temperature", "uld_teacher_temperature", "uld_skip_student_eos", "uld_skip_teacher_eos",
    "uld_use_hybrid_loss", "uld_hybrid_matched_weight", "uld_hybrid_unmatched_weight", "use_extended_uld",
    "use_vllm", "vllm_mode", "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
    "vllm_group_port", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "vllm_max_model_length",
    "vllm_model_impl", "vllm_structured_outputs_regex", "vllm_sync_frequency", "vllm_enable_sleep_mode",
    "log_completions", "log_completions_steps", "num_completions_to_print", "learning_rate",
]


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_trl_field_names_and_defaults_match():
    from trl.experimental.gold import GOLDConfig as TRLGOLDConfig

    ours, theirs = _defaults(GOLDConfig), _defaults(TRLGOLDConfig)
    for name in TRL_FIELDS:
        assert name in ours, name
        assert ours[name] == theirs[name], (name, ours[name], theirs[name])
    # generation_batch_size and model_revision exist too
    assert "generation_batch_size" in ours and "model_revision" in ours
    # our default merge is the correct first-position merge, not TRL's shifted "observed"
    assert ours["uld_token_merge_strategy"] == "first" and theirs["uld_token_merge_strategy"] == "observed"


@pytest.mark.parametrize("given,canonical", [("observed", "first"), ("bayesian", "last"), ("first", "first"),
                                             ("last", "last")])
def test_trl_merge_names_are_mapped(tmp_path, given, canonical):
    args = GOLDConfig(output_dir=str(tmp_path), uld_token_merge_strategy=given, report_to="none")
    assert args.uld_token_merge_strategy == canonical


def test_generation_batch_size_defaults_to_window_over_generations(tmp_path):
    args = GOLDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                      num_generations=2, lmbda=1.0, report_to="none")
    assert args.generation_batch_size == 4


@pytest.mark.parametrize(
    "overrides,words",
    [
        (dict(lmbda=1.5), ["lmbda", "[0, 1]"]),
        (dict(beta=-0.1), ["beta"]),
        (dict(num_generations=8, per_device_train_batch_size=2, gradient_accumulation_steps=2),
         ["num_generations", "per_device_train_batch_size", "gradient_accumulation_steps"]),
        (dict(generation_batch_size=3, per_device_train_batch_size=2), ["generation_batch_size"]),
        (dict(max_completion_length=256, max_length=128), ["max_completion_length", "max_length"]),
        (dict(uld_token_merge_strategy="middle"), ["uld_token_merge_strategy"]),
        (dict(uld_loss_mode="approx"), ["uld_loss_mode"]),
        (dict(uld_hybrid_matched_weight=0.5), ["uld_hybrid_matched_weight", "uld_hybrid_unmatched_weight"]),
        (dict(uld_skip_student_eos=False), ["uld_skip_student_eos", "uld_skip_teacher_eos"]),
        (dict(uld_student_temperature=0.0), ["uld_student_temperature"]),
        (dict(use_extended_uld=False), ["use_extended_uld"]),
        (dict(vllm_mode="remote"), ["vllm_mode"]),
        (dict(teacher_model_init_kwargs="{not json"), ["teacher_model_init_kwargs"]),
    ],
)
def test_validation_errors_name_the_field(tmp_path, overrides, words):
    with pytest.raises(ValueError) as error:
        GOLDConfig(output_dir=str(tmp_path), report_to="none", **overrides)
    for word in words:
        assert word in str(error.value)


def test_init_kwargs_accept_json_text(tmp_path):
    args = GOLDConfig(output_dir=str(tmp_path), report_to="none", teacher_model_init_kwargs='{"dtype": "float32"}')
    assert args.teacher_model_init_kwargs == {"dtype": "float32"}
