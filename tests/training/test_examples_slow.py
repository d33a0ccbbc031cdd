"""The seed's two example scripts (TRL's GOLDTrainer usage) with pkg: names instead of hub ids, on the real
packaged models: SmolLM2-135M-Instruct student; a same-tokenizer teacher (generalized JSD) and the Gemma-3
270M teacher (cross-tokenizer hybrid ULD, ~100 s to load)."""

import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name a prime number larger than ten.", "Write a haiku about rain.",
           "Give one word that rhymes with cat."]
DATASET = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
           for p, a in zip(PROMPTS, ["Paris.", "Eleven is a prime number.",
                                     "Soft rain on the roof / the garden drinks slowly / clouds hum their grey song",
                                     "Hat."])]


def test_example_same_tokenizer_generalized_jsd(tmp_path):
    from transformers import AutoModelForCausalLM

    from gold_pipeline import GOLDConfig, GOLDTrainer
    from gold_pipeline.models.loading import load_model
    from gold_pipeline.text.tokenizers import load_tokenizer

    student_name = teacher_name = "pkg:smollm2-135m-instruct"
    tokenizer = load_tokenizer(student_name)
    model = load_model(student_name)
    teacher_model = load_model(teacher_name)
    training_args = GOLDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, lmbda=0.5,
                               max_completion_length=16, logging_steps=1, report_to="none", save_strategy="no",
                               use_cpu=True, learning_rate=1e-5)
    trainer = GOLDTrainer(model=model, teacher_model=teacher_model, args=training_args, train_dataset=DATASET,
                          processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))


def test_example_cross_tokenizer_hybrid_uld(tmp_path):
    import math

    from gold_pipeline import GOLDConfig, GOLDTrainer

    training_args = GOLDConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        lmbda=0.5,
        max_completion_length=16,
        teacher_model_name_or_path="pkg:gemma3-270m",
        teacher_tokenizer_name_or_path="pkg:gemma3-270m",
        use_uld_loss=True,
        uld_use_hybrid_loss=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        learning_rate=1e-5,
    )
    trainer = GOLDTrainer(model="pkg:smollm2-135m-instruct", args=training_args, train_dataset=DATASET)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
