"""Training from `gold align` output: streamed shards, tokenizer fingerprints checked against the manifest,
cached teacher top-K used off-policy (with lmbda=0 no teacher model at all)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import (
    CONVERSATIONS,
    STUDENT_TOKENIZER,
    TEACHER_TOKENIZER,
    fixed_batch_loss,
    gold_args,
    tiny_model,
    tokenizer,
    train_losses,
)


@pytest.fixture(scope="module")
def aligned_dir(tmp_path_factory):
    from gold_pipeline.align.config import AlignConfig
    from gold_pipeline.align.job import run_align

    root = tmp_path_factory.mktemp("aligned")
    source = root / "conversations.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    out = root / "aligned"
    run_align(AlignConfig(out=str(out), student_tokenizer=STUDENT_TOKENIZER, teacher_tokenizer=TEACHER_TOKENIZER,
                          dataset=str(source), shard_size=3))
    return out


@pytest.fixture(scope="module")
def aligned_topk_dir(aligned_dir, tmp_path_factory):
    """The aligned shards plus exact teacher top-K (K=8) columns from the tiny teacher, as a teacher cache
    would write them."""
    import shutil

    from gold_pipeline.data.schemas import ALIGNED_SCHEMA

    out = tmp_path_factory.mktemp("aligned_topk") / "aligned"
    shutil.copytree(aligned_dir, out)
    teacher = tiny_model(TEACHER_TOKENIZER, 1)
    for path in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(path)
        rows = table.to_pylist()
        for row in rows:
            prompt, completion = row["teacher_prompt_ids"], row["teacher_completion_ids"]
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logprobs = torch.log_softmax(teacher(ids).logits[0, len(prompt) - 1 : -1].float(), -1)  # (m, Vt)
            top = logprobs.topk(8, dim=-1)
            row["teacher_topk_ids"] = top.indices.tolist()
            row["teacher_topk_logprobs"] = top.values.tolist()
            row["teacher_token_logprobs"] = logprobs.gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()
        pq.write_table(pa.Table.from_pylist(rows, schema=ALIGNED_SCHEMA), path)
    return out


def _trainer(tmp_path, data, *, teacher=True, student_tokenizer=STUDENT_TOKENIZER, **overrides):
    from gold_pipeline.training import GOLDTrainer

    return GOLDTrainer(
        model=tiny_model(student_tokenizer, 0),
        teacher_model=tiny_model(TEACHER_TOKENIZER, 1) if teacher else None,
        args=gold_args(tmp_path, **overrides),
        train_dataset=str(data),
        processing_class=tokenizer(student_tokenizer),
        teacher_processing_class=tokenizer(TEACHER_TOKENIZER),
    )


def test_trains_from_aligned_shards_streamed(tmp_path, aligned_dir):
    from gold_pipeline.training.datasets import AlignedShardDataset

    trainer = _trainer(tmp_path, aligned_dir, max_steps=3)
    dataset = trainer.train_dataset
    assert isinstance(dataset, AlignedShardDataset) and len(dataset) == len(CONVERSATIONS)
    assert len(dataset.block_ranges()) >= 3  # 3 shards of <= 3 rows
    before = fixed_batch_loss(trainer)
    trainer.train()
    assert fixed_batch_loss(trainer) < before
    assert len(dataset._cache) <= dataset._cache_size  # row groups are read on demand, never all at once


def test_aligned_rows_equal_rows_aligned_on_the_fly(tmp_path, aligned_dir):
    from gold_pipeline.text.pair import TokenizerPair
    from gold_pipeline.training.datasets import AlignedShardDataset, RawConversationDataset

    pair = TokenizerPair.build(tokenizer(STUDENT_TOKENIZER), tokenizer(TEACHER_TOKENIZER))
    shards = AlignedShardDataset(aligned_dir, pair, max_completion_length=64, max_length=None)
    raw = RawConversationDataset(CONVERSATIONS, pair, max_completion_length=64, max_length=None)
    by_id = {raw[i]["sample_id"]: raw[i] for i in range(len(raw))}
    for i in range(len(shards)):
        row = shards[i]
        other = by_id[row["sample_id"]]
        for key in ("student_completion_ids", "teacher_completion_ids", "student_group_ids", "teacher_group_ids",
                    "student_prompt_ids", "teacher_prompt_ids"):
            assert list(row[key]) == list(other[key]), key


def test_cached_topk_with_lmbda_zero_needs_no_teacher(tmp_path, aligned_topk_dir):
    trainer = _trainer(tmp_path, aligned_topk_dir, teacher=False, lmbda=0.0, max_steps=3)
    assert trainer.teacher_model is None and trainer.use_cached_topk
    before = fixed_batch_loss(trainer)
    trainer.train()
    assert fixed_batch_loss(trainer) < before
    assert all(np.isfinite(train_losses(trainer)))


def test_manifest_of_other_tokenizers_is_refused(tmp_path, aligned_dir):
    with pytest.raises(ValueError, match="student tokenizer") as error:
        _trainer(tmp_path, aligned_dir, student_tokenizer="pkg:cl100k")
    assert "gold align" in str(error.value)


def test_topk_columns_are_read_as_array_rows_and_collate_like_lists():
    import numpy as np
    import pyarrow as pa

    from gold_pipeline.training.datasets import _array_rows

    rows = [[[1, 2, 3], [4, 5, 6]], [], [[7, 8, 9]]]
    kind = pa.list_(pa.list_(pa.int32()))
    column = pa.chunked_array([pa.array(rows[:1], type=kind), pa.array(rows[1:], type=kind)])
    got = _array_rows(column)
    assert [r.tolist() for r in got] == rows and got[0].shape == (2, 3) and got[1].shape == (0, 3)
    flat = _array_rows(pa.chunked_array([pa.array([[0.5, -1.0], [], [2.0]])]))
    assert [r.tolist() for r in flat] == [[0.5, -1.0], [], [2.0]]
    sliced = pa.array(rows, type=kind).slice(1)
    assert [r.tolist() for r in _array_rows(sliced)] == rows[1:]
    # null rows or ragged inner lists: plain Python lists, as before
    assert _array_rows(pa.array([[[1]], None])) == [[[1]], None]
    assert _array_rows(pa.array([[[1, 2], [3]]])) == [[[1, 2], [3]]]
    assert isinstance(np.asarray(got[2]), np.ndarray)
