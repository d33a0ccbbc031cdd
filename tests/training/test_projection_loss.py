"""The projection loss (issue 14) through GOLDConfig and GOLDTrainer: off by default, validated, and trained end to
end on tiny models with a multi-digit student tokenizer (cl100k) and a one-digit-per-token teacher (SmolLM2)."""

import math

import pytest

from gold_pipeline.errors import GoldInputError
from tests.helpers import gold_args, make_trainer

NUMBERS = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": f"{a} + {b} = {a + b}. So the answer is {a + b}."}]}
           for a, b in ((123, 456), (250, 775), (31, 908), (4096, 17), (640, 360), (999, 1))]


def test_projection_is_off_by_default_and_validated(tmp_path):
    assert gold_args(tmp_path).uld_use_projection_loss is False
    with pytest.raises(GoldInputError, match="uld_use_hybrid_loss=True"):
        gold_args(tmp_path, uld_use_projection_loss=True, uld_use_hybrid_loss=False)
    with pytest.raises(GoldInputError, match='uld_token_merge_strategy="first"'):
        gold_args(tmp_path, uld_use_projection_loss=True, uld_token_merge_strategy="last")
    with pytest.raises(GoldInputError, match="uld_projection_max_pieces"):
        gold_args(tmp_path, uld_use_projection_loss=True, uld_projection_max_pieces=1)


def test_trainer_logs_teacher_mass_per_kind_of_column(tmp_path):
    trainer = make_trainer(tmp_path, student="pkg:cl100k", teacher="pkg:smollm2", data=NUMBERS, max_steps=2,
                           uld_use_projection_loss=True, max_completion_length=32)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    last = logs[-1]
    for key in ("projected_loss", "teacher_mass_matched", "teacher_mass_projected", "teacher_mass_unmatched"):
        assert key in last, key
    # multi-digit student tokens were compared token by token (a random tiny teacher gives them almost no mass)
    assert last["projected_loss"] > 0 and last["teacher_mass_projected"] >= 0
    assert last["teacher_mass_matched"] + last["teacher_mass_unmatched"] == pytest.approx(1.0, abs=1e-3)


def test_gold_train_options_reach_the_projection_fields():
    from gold_pipeline.training.trl_args import train_options

    options = train_options(config=None, command_line={"uld_use_projection_loss": True}, set_items=[
        "uld_projection_weight=0.5"], argv=["--uld_projection_max_pieces", "3"])
    assert (options["uld_use_projection_loss"], options["uld_projection_weight"],
            options["uld_projection_max_pieces"]) == (True, 0.5, 3)
