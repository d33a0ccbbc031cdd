"""Training data pieces: collation to flat completion tensors with global group ids, the resumable sampler,
completion cuts at common group boundaries, the on/off-policy draw, refusals of bad input."""

import numpy as np
import pytest
import torch

from gold_pipeline.align.row import cut_at_group
from gold_pipeline.data.sources import examples_from_records
from gold_pipeline.errors import GoldInputError, InvalidRowError
from gold_pipeline.models.generation import cut_at_stop
from gold_pipeline.text.bytes import ByteTable
from gold_pipeline.training.collate import collate_rows
from gold_pipeline.training.datasets import GenerationGroupSampler, fit_row
from gold_pipeline.training.loss import completion_positions
from gold_pipeline.training.rollouts import on_policy_flags


def _table(token_bytes: dict[int, bytes], size: int = 32) -> ByteTable:
    """A tiny byte table: the given ids carry these bytes, every other id one byte b"x"; ids 2 and 9 none."""
    rows = [token_bytes.get(i, b"" if i in (2, 9) else b"x") for i in range(size)]
    lengths = np.array([len(b) for b in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return ByteTable("byte_level", tuple(rows), lengths, lengths == 0, False,
                     flat=np.frombuffer(b"".join(rows), dtype=np.uint8), offsets=offsets)


class _Pair:
    student_table = _table({20: b"a", 21: b"\xc3", 22: b"\xa9"})
    student_pad_id = 0
    teacher_pad_id = 0
    student_eot_ids = [2]
    teacher_eot_ids = [9]


def _row(prompt, completion, groups, t_prompt, t_completion, t_groups, text="xxxx"):
    return dict(sample_id="x", completion_text=text, student_prompt_ids=prompt, student_completion_ids=completion,
                student_group_ids=groups, teacher_prompt_ids=t_prompt, teacher_completion_ids=t_completion,
                teacher_group_ids=t_groups)


def test_collate_puts_completions_at_shared_columns_and_offsets_groups():
    rows = [
        _row([5, 6, 7], [11, 12, 2], [0, 0, -1], [1], [21, 9], [0, -1]),
        _row([5], [13, 14, 15, 2], [0, 1, 1, -1], [1, 3, 4], [22, 23, 9], [0, 1, -1]),
    ]
    batch = collate_rows(rows, _Pair())
    assert batch["num_groups"].item() == 3
    assert batch["student_group_ids"].tolist() == [0, 0, -1, 1, 2, 2, -1]
    assert batch["teacher_group_ids"].tolist() == [0, -1, 1, 2, -1]
    # the logits at `positions` predict exactly the flat completion tokens, in row-major order
    pos = completion_positions(batch)  # (L,)
    predicted = batch["input_ids"][:, pos + 1][batch["completion_mask"]]
    assert predicted.tolist() == batch["student_token_ids"].tolist() == [11, 12, 2, 13, 14, 15, 2]
    t_pos = completion_positions(batch, "teacher_")
    assert batch["teacher_input_ids"][:, t_pos + 1][batch["teacher_completion_mask"]].tolist() == [21, 9, 22, 23, 9]
    # left-padded prompts get position ids that start at 0 on the first real token
    assert batch["position_ids"][1].tolist()[:3] == [0, 0, 0]
    assert batch["attention_mask"][1].tolist()[:3] == [0, 0, 1]


def test_fit_row_cuts_at_a_common_group_boundary():
    row = _row([1], [10, 11, 12, 13, 2], [0, 1, 1, 2, -1], [1], [20, 21, 22, 9], [0, 1, 2, -1])
    row["num_groups"] = 3
    out = fit_row(row, _Pair(), max_completion_length=3, budget=None)
    # group 1 spans student tokens 1..2, group 2 would end at student token 3 (> limit) -> keep groups 0, 1
    assert out["student_completion_ids"] == [10, 11, 12] and out["student_group_ids"] == [0, 1, 1]
    assert out["teacher_completion_ids"] == [20, 21] and out["teacher_group_ids"] == [0, 1]
    assert out["num_groups"] == 2 and out["truncated"]
    assert out["completion_text"] == "xxx"  # the kept text follows the cut


def test_fit_row_never_cuts_inside_a_utf8_character():
    # regression (fit_row vs gold align's cut): "aé" as a, 0xC3, 0xA9 on both sides; the boundary after 0xC3 is
    # a common group boundary but inside "é", so a 2-token limit keeps only "a"
    row = _row([1], [20, 21, 22], [0, 1, 2], [1], [20, 21, 22], [0, 1, 2], text="aé")
    out = fit_row(row, _Pair(), max_completion_length=2, budget=None)
    assert out["student_completion_ids"] == [20] and out["teacher_completion_ids"] == [20]
    assert out["completion_text"] == "a" and out["num_groups"] == 1


def test_cut_at_group_is_utf8_safe_and_fits_both_budgets():
    groups = np.array([0, 1, 2])
    cut = cut_at_group(groups, groups, 3, np.array([1, 1, 1]), "aé".encode(), 2, 2)
    assert (cut.groups, cut.student_tokens, cut.teacher_tokens, cut.text_bytes) == (1, 1, 1, 1)
    cut = cut_at_group(groups, np.array([0, 0, 1, 2, 2]), 3, np.array([1, 1, 1]), b"abc", 3, 3)
    assert (cut.groups, cut.student_tokens, cut.teacher_tokens) == (2, 2, 3)


def test_prompt_budget_keeps_the_end():
    row = _row(list(range(10)), [10], [0], list(range(8)), [20], [0])
    row["num_groups"] = 1
    out = fit_row(row, _Pair(), max_completion_length=4, budget=3)
    assert out["student_prompt_ids"] == [7, 8, 9] and out["teacher_prompt_ids"] == [5, 6, 7]


def test_sampler_is_seeded_repeats_generations_and_resumes_exactly():
    data = list(range(10))
    sampler = GenerationGroupSampler(data, num_generations=2, seed=3)
    first = list(sampler)
    assert len(first) == 20 and all(first[i] == first[i + 1] for i in range(0, 20, 2))
    assert sorted(set(first)) == data
    assert list(GenerationGroupSampler(data, num_generations=2, seed=3)) == first  # same seed, same order
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new epoch reshuffles


def test_on_policy_flags_depend_on_step_only():
    a = on_policy_flags(0.5, seed=1, global_step=7, num_slices=8)
    assert a == on_policy_flags(0.5, seed=1, global_step=7, num_slices=8)
    assert on_policy_flags(0.0, seed=1, global_step=7, num_slices=3) == [False] * 3
    assert on_policy_flags(1.0, seed=1, global_step=7, num_slices=3) == [True] * 3
    draws = [f for step in range(200) for f in on_policy_flags(0.3, seed=0, global_step=step, num_slices=2)]
    assert 0.2 < sum(draws) / len(draws) < 0.4


def test_sampled_ids_are_cut_after_the_first_stop_and_bytes_to_valid_text():
    from gold_pipeline.align.groups import completion_text_from_ids

    assert cut_at_stop([5, 6, 2, 0, 0], [2]) == ([5, 6, 2], "stop")
    assert cut_at_stop([5, 6], [2]) == ([5, 6], "length")
    assert cut_at_stop([5, 6, 7, 2], [2], 3) == ([5, 6, 7], "length")
    table = _table({20: b"a", 21: b"\xc3", 22: b"\xa9"})
    assert completion_text_from_ids(table, [20, 21, 22, 20, 21]) == ("aéa", 4)


def test_empty_and_unknown_datasets_are_refused():
    from gold_pipeline.training.datasets import build_dataset

    with pytest.raises(GoldInputError, match="empty"):
        build_dataset([], _Pair(), max_completion_length=8, max_length=None, what="train_dataset")
    with pytest.raises(GoldInputError, match="not an aligned-shard directory"):
        build_dataset("/nonexistent/dir", _Pair(), max_completion_length=8, max_length=None, what="train_dataset")
    with pytest.raises(GoldInputError, match="train_dataset"):
        build_dataset(iter([]), _Pair(), max_completion_length=8, max_length=None, what="train_dataset")


def test_training_rows_are_validated_like_gold_align():
    # regression: training's own row parser accepted an empty completion that `gold align` refuses
    examples = examples_from_records([{"prompt": "hi", "completion": "yo"},
                                      {"messages": [{"role": "user", "content": "q"},
                                                    {"role": "assistant", "content": "a"}]}])
    assert examples[0].prompt_messages == [{"role": "user", "content": "hi"}] and examples[0].completion_text == "yo"
    assert examples[1].completion_text == "a" and len(examples[1].prompt_messages) == 1
    with pytest.raises(InvalidRowError, match="Row 1 .*train_dataset.*empty string"):
        examples_from_records([{"prompt": "hi", "completion": "yo"}, {"prompt": "hi", "completion": ""}])
    with pytest.raises(InvalidRowError, match="Row 4"):
        examples_from_records([{"prompt": "p", "completion": "c"}] * 4 + [{"messages": [{"role": "user",
                                                                                         "content": "q"}]}])
    assert issubclass(InvalidRowError, GoldInputError) and torch.tensor(1).item() == 1
