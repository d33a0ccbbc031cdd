"""The Arrow schemas are explicit, documented, and round-trip through Parquet and polars unchanged."""

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gold_pipeline.data import schemas


@pytest.mark.parametrize("kind", ["aligned", "teacher", "vocab_map", "projection"])
def test_every_field_is_documented_and_tagged(kind):
    schema = schemas.schema_for(kind)
    assert schema.metadata[b"gold.kind"] == kind.encode()
    assert schema.metadata[b"gold.schema_version"] == str(schemas.SCHEMA_VERSION).encode()
    undocumented = [f.name for f in schema if not (f.metadata or {}).get(b"doc")]
    assert undocumented == []


def test_design_columns_present_with_exact_types():
    ids = pa.list_(pa.int32())
    for name in ("student_prompt_ids", "student_completion_ids", "teacher_prompt_ids", "teacher_completion_ids",
                 "student_group_ids", "teacher_group_ids"):
        assert schemas.ALIGNED_SCHEMA.field(name).type == ids
    assert schemas.TEACHER_SCHEMA.field("teacher_topk_ids").type == pa.list_(ids)
    assert schemas.TEACHER_SCHEMA.field("teacher_topk_logprobs").type == pa.list_(pa.list_(pa.float16()))
    assert schemas.TEACHER_SCHEMA.field("messages").type.value_type.names == ["role", "content"]
    assert schemas.VOCAB_MAP_SCHEMA.names == ["student_id", "teacher_id"]
    # top-k columns of the aligned output are the teacher cache's, so they carry over without a cast
    for name in ("teacher_token_logprobs", "teacher_topk_ids", "teacher_topk_logprobs"):
        assert schemas.ALIGNED_SCHEMA.field(name).type == schemas.TEACHER_SCHEMA.field(name).type
        assert schemas.ALIGNED_SCHEMA.field(name).nullable


def test_teacher_row_round_trips_through_parquet_and_polars(tmp_path):
    row = {
        "sample_id": "s", "row_index": 0, "generation_index": 0,
        "messages": [{"role": "user", "content": "hi"}], "prompt_text": None, "completion_text": "yo",
        "teacher_prompt_ids": [1, 2], "teacher_completion_ids": [3, 4],
        "teacher_token_logprobs": [-0.5, -0.25],
        "teacher_topk_ids": [[3, 9], [4, 8]], "teacher_topk_logprobs": [[-0.5, -1.5], [-0.25, -2.0]],
        "finish_reason": "stop",
    }
    table = pa.Table.from_pylist([row], schema=schemas.TEACHER_SCHEMA)
    pq.write_table(table, tmp_path / "x.parquet")
    frame = pl.read_parquet(tmp_path / "x.parquet")
    assert frame.row(0, named=True) == row
    assert frame.schema["teacher_topk_logprobs"] == pl.List(pl.List(pl.Float16))


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="Unknown output kind"):
        schemas.schema_for("nope")
