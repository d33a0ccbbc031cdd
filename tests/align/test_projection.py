"""Projection table (issue 14) on real packaged tokenizers: cl100k (up to three digits per token) as the student,
SmolLM2 (one digit per token) as the teacher; written by `gold align` beside the vocab map, readable with polars."""

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from gold_pipeline.align.config import PROJECTION_FILE, AlignConfig
from gold_pipeline.align.job import run_align
from gold_pipeline.data.schemas import PROJECTION_SCHEMA
from gold_pipeline.losses.projection import projection_columns
from gold_pipeline.text.projection import KINDS, cached_projection, projection_arrow
from gold_pipeline.text.vocab_map import cached_vocab_map
from tests.helpers import table, tok

STUDENT, TEACHER = "pkg:cl100k", "pkg:smollm2"


@pytest.fixture(scope="module")
def projection():
    return cached_projection(table(STUDENT), table(TEACHER), tok(TEACHER))


def test_multi_digit_student_tokens_project_onto_one_teacher_digit_each(projection):
    s_table, t_table = table(STUDENT), table(TEACHER)
    digit_id = {bytes([c]): t for t, b in enumerate(t_table.token_bytes) if len(b) == 1 and b.isdigit()
                for c in b}
    multi = [i for i, b in enumerate(s_table.token_bytes) if len(b) >= 2 and b.isdigit() and not s_table.is_special[i]]
    assert len(multi) >= 1000  # cl100k has every 2- and 3-digit number
    for sid in multi:
        kind, pieces = projection.row(sid)
        assert kind == "projected"
        assert pieces == [digit_id[bytes([c])] for c in s_table.token_bytes[sid]]
    assert projection.row(tok(STUDENT).encode("123", add_special_tokens=False)[0])[0] == "projected"


def test_every_row_spells_the_student_bytes_and_matched_rows_are_the_vocab_map(projection):
    s_table, t_table = table(STUDENT), table(TEACHER)
    pairs = cached_vocab_map(s_table, t_table)
    counts = projection.counts()
    assert counts["matched"] == len(pairs)
    assert counts["projected"] > 10_000
    matched = projection.kinds == KINDS.index("matched")
    assert np.array_equal(projection.student_ids[matched], pairs[:, 0])
    starts = projection.offsets[:-1][matched]
    assert np.array_equal(projection.pieces[starts], pairs[:, 1])
    for r in np.flatnonzero(projection.kinds != KINDS.index("unencodable"))[::4].tolist():  # every 4th row
        sid = int(projection.student_ids[r])
        pieces = projection.pieces[projection.offsets[r]:projection.offsets[r + 1]].tolist()
        assert b"".join(t_table.token_bytes[t] for t in pieces) == s_table.token_bytes[sid]
        weights = projection.weights[projection.offsets[r]:projection.offsets[r + 1]]
        assert weights.sum() == pytest.approx(1.0, abs=1e-6) and np.all(np.diff(weights) <= 0)


def test_loss_columns_hold_only_projected_rows(projection):
    columns = projection_columns(projection, table(STUDENT).vocab_size, table(TEACHER).vocab_size)
    assert columns.num_columns == projection.counts()["projected"]
    assert int(columns.lengths.min()) >= 2 and columns.depth == 4
    first = columns.pieces[:, 0]
    assert bool((first[1:] >= first[:-1]).all())  # sorted by first piece (the CSR index of live_pairs)


def test_gold_align_writes_the_projection_beside_the_vocab_map(tmp_path):
    source = tmp_path / "rows.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]} for a, b in ((123, 456), (17, 5))]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "aligned"
    stats = run_align(AlignConfig(out=str(out), dataset=str(source), student_tokenizer=STUDENT,
                                  teacher_tokenizer=TEACHER, progress=False))
    path = out / PROJECTION_FILE
    assert pq.read_schema(path).equals(PROJECTION_SCHEMA, check_metadata=False)
    frame = pl.read_parquet(path)
    kinds = dict(frame.group_by("kind").len().iter_rows())
    assert kinds == {k: v for k, v in stats["projection"]["kinds"].items() if v}
    coverage = stats["projection"]["coverage"]
    # cl100k's multi-digit numerals are never byte-identical to SmolLM2's single digits; projected they all count
    assert coverage["numeral_tokens_matched"] < 0.05 and coverage["numeral_tokens"] > 0.99
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["projection"] == PROJECTION_FILE
    row = frame.filter(pl.col("student_id") == tok(STUDENT).encode("579", add_special_tokens=False)[0])
    assert row["kind"].item() == "projected" and len(row["teacher_ids"].item()) == 3


def test_projection_arrow_round_trips(projection):
    arrow = projection_arrow(projection)
    assert arrow.schema.equals(PROJECTION_SCHEMA)
    assert arrow.num_rows == projection.student_ids.size
