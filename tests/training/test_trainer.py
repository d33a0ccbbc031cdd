"""End-to-end GOLDTrainer runs on tiny models (configs) with real packaged tokenizers:
Mistral SentencePiece student <- DeepSeek byte-level teacher."""

import json
import math

import pytest
import torch

from tests.helpers import (
    CONVERSATIONS,
    DEEPSEEK_TOKENIZER,
    STUDENT_TOKENIZER,
    TEACHER_TOKENIZER,
    fixed_batch_loss,
    gold_args,
    make_trainer,
    tiny_model,
    tokenizer,
    train_losses,
)


def test_off_policy_cross_tokenizer_loss_falls_on_a_fixed_batch(tmp_path):
    # Mistral SentencePiece 32k student <- DeepSeek-V3 byte-level 129k teacher
    trainer = make_trainer(tmp_path, teacher=DEEPSEEK_TOKENIZER, lmbda=0.0, max_steps=4)
    before = fixed_batch_loss(trainer)
    trainer.train()
    after = fixed_batch_loss(trainer)
    assert after < before
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(h["on_policy_share"] == 0.0 for h in logs)
    for key in ("distillation_loss", "matched_loss", "unmatched_loss", "tokens_per_second", "excluded_token_share"):
        assert key in logs[-1], key
    # metrics go to the jsonl file as well
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("skip_eos", [True, False])
def test_stop_groups_pair_the_end_of_turn_columns(tmp_path, skip_eos):
    # regression (issue 14): with stop groups on (uld_skip_*_eos False), the end-of-turn tokens, special and without
    # bytes, had no vocab-map partner, so a stop group's mass fell to ULD and no distillation term taught the stop
    trainer = make_trainer(tmp_path, uld_skip_student_eos=skip_eos, uld_skip_teacher_eos=skip_eos, max_steps=1)
    student_eot, teacher_eot = trainer.pair.student_eot_ids[0], trainer.pair.teacher_eot_ids[0]
    paired = int(trainer.vocab_map.teacher_to_student("cpu")[teacher_eot])
    assert paired == (-1 if skip_eos else student_eot)
    trainer.train()
    assert math.isfinite(train_losses(trainer)[-1])


def test_on_policy_samples_are_aligned_online_and_loss_falls(tmp_path):
    trainer = make_trainer(tmp_path, lmbda=1.0, max_steps=3, log_completions=True, log_completions_steps=1)
    before = fixed_batch_loss(trainer)
    trainer.train()
    after = fixed_batch_loss(trainer)
    assert after < before
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["on_policy_share"] == 1.0 and h["generated_tokens"] > 0 for h in logs)
    assert all(0.0 < h["generation_time_share"] <= 1.0 for h in logs)
    completions = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert completions and json.loads(completions[0])["policy"] == "on"


def test_same_tokenizer_pair_trains_with_generalized_jsd(tmp_path):
    trainer = make_trainer(tmp_path, teacher=STUDENT_TOKENIZER, use_uld_loss=False, uld_use_hybrid_loss=False,
                           lmbda=0.5, max_steps=3, beta=0.5)
    before = fixed_batch_loss(trainer)
    trainer.train()
    assert fixed_batch_loss(trainer) < before
    assert all(math.isfinite(x) for x in train_losses(trainer))


def test_jsd_refuses_a_cross_tokenizer_pair(tmp_path):
    with pytest.raises(ValueError, match="use_uld_loss=True"):
        make_trainer(tmp_path, use_uld_loss=False, uld_use_hybrid_loss=False)


def test_seq_kd_trains_on_teacher_completions(tmp_path, monkeypatch):
    from gold_pipeline.training import trainer as trainer_module

    samplers = []
    real = trainer_module.rollout_slices

    def spy(slices, which, **kwargs):
        samplers.append(kwargs["sampler"])
        return real(slices, which, **kwargs)

    monkeypatch.setattr(trainer_module, "rollout_slices", spy)
    trainer = make_trainer(tmp_path, seq_kd=True, lmbda=0.0, max_steps=2)
    weights = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert samplers == ["teacher"] * 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["seq_kd_loss"]) and h["seq_kd_loss"] > 0 for h in logs)
    assert not torch.equal(weights, trainer.model.lm_head.weight)


def test_zero_distillation_weight_skips_the_distillation_term(tmp_path, monkeypatch):
    # seq_kd/sft runs (uld_distillation_weight=0) used to compute the whole merged ULD/hybrid loss and multiply
    # it by 0: about a fifth of a step on the digits bench
    from gold_pipeline.losses import logits as logits_module

    def refuse(*args, **kwargs):
        raise AssertionError("the distillation term was computed at weight 0")

    monkeypatch.setattr(logits_module, "chunked_merged_loss", refuse)
    trainer = make_trainer(tmp_path, lmbda=0.0, max_steps=2, uld_distillation_weight=0.0, uld_crossentropy_weight=1.0)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["distillation_loss"] == 0.0 and h["crossentropy_loss"] > 0 for h in logs)
    assert logs[0]["loss"] == pytest.approx(logs[0]["crossentropy_loss"], rel=1e-5)


def test_saved_student_loads_with_auto_model(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trainer.model(ids).logits, atol=1e-5)


def test_resume_gives_the_same_next_losses(tmp_path):
    full = make_trainer(tmp_path / "a", lmbda=0.5, max_steps=4, save_strategy="steps", save_steps=2,
                        gradient_accumulation_steps=1)
    full.train()
    expected = train_losses(full)
    resumed = make_trainer(tmp_path / "b", lmbda=0.5, max_steps=4, save_strategy="no", gradient_accumulation_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    losses = train_losses(resumed)  # the checkpoint's log history (steps 1-2) + the resumed steps 3-4
    assert len(expected) == 4 and len(losses) == 4
    assert losses[2:] == pytest.approx(expected[2:], rel=1e-5, abs=1e-7)


def test_lora_trains_adapters_only(tmp_path):
    trainer = make_trainer(tmp_path, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                           lora_target_modules=["q_proj", "v_proj"], max_steps=2, learning_rate=5e-2)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if "lora_" not in n and not torch.equal(p, base[n])]
    assert changed == []
    assert any("lora_" in n and p.requires_grad for n, p in trainer.model.named_parameters())
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_eval_reports_student_bits_per_byte(tmp_path):
    from gold_pipeline.training import GOLDTrainer

    trainer = GOLDTrainer(model=tiny_model(STUDENT_TOKENIZER, 0), teacher_model=tiny_model(TEACHER_TOKENIZER, 1),
                          args=gold_args(tmp_path), train_dataset=CONVERSATIONS, eval_dataset=CONVERSATIONS[:3],
                          processing_class=tokenizer(STUDENT_TOKENIZER),
                          teacher_processing_class=tokenizer(TEACHER_TOKENIZER))
    metrics = trainer.evaluate()
    # a random 32k-vocabulary model: about log2(32000) / (bytes per token) bits per byte
    assert 0.5 < metrics["eval_bits_per_byte"] < 15


def test_embedding_smaller_than_tokenizer_is_refused(tmp_path):
    from gold_pipeline.models.loading import tiny_model_for
    from gold_pipeline.training import GOLDTrainer

    small = tiny_model_for(tokenizer(STUDENT_TOKENIZER), vocab_size=1000, hidden_size=16, intermediate_size=32,
                           num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="embedding rows"):
        GOLDTrainer(model=small, teacher_model=tiny_model(TEACHER_TOKENIZER, 1), args=gold_args(tmp_path),
                    train_dataset=CONVERSATIONS, processing_class=tokenizer(STUDENT_TOKENIZER),
                    teacher_processing_class=tokenizer(TEACHER_TOKENIZER))


def test_short_final_batch_is_kept_and_logged(tmp_path, caplog):
    trainer = make_trainer(tmp_path, data=CONVERSATIONS[:3], per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, max_steps=-1, num_train_epochs=1)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert "Short final window" in caplog.text


def test_num_generations_samples_each_prompt_several_times_in_one_window(tmp_path, monkeypatch):
    from gold_pipeline.training import trainer as trainer_module

    windows = []
    real = trainer_module.rollout_slices

    def spy(slices, which, **kwargs):
        windows.append([row["sample_id"] for i in which for row in slices[i]])
        return real(slices, which, **kwargs)

    monkeypatch.setattr(trainer_module, "rollout_slices", spy)
    trainer = make_trainer(tmp_path, lmbda=1.0, num_generations=2, max_steps=1)
    assert trainer.args.generation_batch_size == 2  # 2 rows * 2 accumulation steps / 2 generations
    trainer.train()
    (window,) = windows
    assert len(window) == 4 and len(set(window)) == 2  # one generate call for the window: 2 prompts x 2 samples


def test_fewer_rows_than_one_batch_with_drop_last_is_refused(tmp_path):
    # regression: such a run used to "train" 0 steps without a word
    with pytest.raises(ValueError, match="0 steps"):
        make_trainer(tmp_path, data=CONVERSATIONS[:1], per_device_train_batch_size=2, dataloader_drop_last=True)
