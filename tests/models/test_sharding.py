"""The frozen teacher stays replicated: a teacher loaded without weights (meta device) or partitioned by ZeRO-3 is
refused with the accelerate config key to change; a plain one is frozen in eval mode."""

import pytest
import torch

from gold_pipeline.errors import GoldInputError
from gold_pipeline.models.sharding import is_sharded, place_teacher, synced_generation
from tests.helpers import TEACHER_TOKENIZER, tiny_model


def test_place_teacher_freezes_a_replicated_teacher():
    teacher = tiny_model(TEACHER_TOKENIZER, 1).train()
    placed = place_teacher(teacher, "cpu")
    assert placed is teacher and not placed.training
    assert not any(p.requires_grad for p in placed.parameters())
    assert not is_sharded(placed) and not synced_generation(placed)


def test_place_teacher_refuses_a_teacher_on_the_meta_device():
    with torch.device("meta"):
        teacher = torch.nn.Linear(4, 4)
    with pytest.raises(GoldInputError, match="fsdp_cpu_ram_efficient_loading: false"):
        place_teacher(teacher, "cpu")


def test_place_teacher_refuses_a_zero3_partitioned_teacher():
    teacher = torch.nn.Linear(4, 4)
    teacher.weight.ds_id = 0  # what deepspeed.zero.Init leaves on a partitioned parameter
    assert is_sharded(teacher)
    with pytest.raises(GoldInputError, match="zero3_init_flag: false"):
        place_teacher(teacher, "cpu")
