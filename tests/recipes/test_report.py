"""gold_pipeline.report: the pure helpers behind the demo's PNG (golden values) and the PNG itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gold_pipeline.recipes.report import loss_curve, sizes_from_group_ids, tail_mass_from_logprobs, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_group_sizes_count_tokens_per_group_across_rows():
    # row 0: groups 0,0,1 ; row 1: 0,1,1,1,-1 (the excluded token is no group) ; row 2: empty
    group_ids = np.array([0, 0, 1, 0, 1, 1, 1, -1], dtype=np.int32)
    lengths = np.array([3, 5, 0])
    assert sizes_from_group_ids(group_ids, lengths).tolist() == [2, 1, 1, 3]


def test_group_sizes_of_nothing_is_empty():
    assert sizes_from_group_ids(np.zeros(0, dtype=np.int32), np.array([0, 0])).tolist() == []


def test_tail_mass_is_one_minus_topk_mass():
    logprobs = np.log(np.array([[0.5, 0.25], [0.9, 0.1], [0.7, 0.30000001]]))  # (N=3, K=2)
    np.testing.assert_allclose(tail_mass_from_logprobs(logprobs), [0.25, 0.0, 0.0], atol=1e-6)
    assert (tail_mass_from_logprobs(logprobs) >= 0).all()  # rounding past 1 is clipped


def test_loss_curve_reads_only_records_with_the_key(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 2.0}, {"step": 1, "train_runtime": 3.0}, {"step": 2, "loss": 1.5}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    steps, values = loss_curve(path)
    assert steps.tolist() == [1, 2] and values.tolist() == [2.0, 1.5]
    assert loss_curve(tmp_path / "missing.jsonl")[0].size == 0


@pytest.mark.parametrize("empty_curves", [False, True])
def test_write_report_writes_a_png(tmp_path, empty_curves):
    curves = {"off-policy": (np.array([]), np.array([]))} if empty_curves else {
        "off-policy": (np.arange(1, 6), np.linspace(1.0, 0.5, 5)),
        "mixed": (np.arange(6, 9), np.array([0.5, 0.45, 0.4])),
    }
    path = write_report(tmp_path / "sub" / "report.png", curves=curves,
                        student_group_sizes=np.array([1, 1, 2, 3, 15]), teacher_group_sizes=np.array([1, 2, 1, 1, 1]),
                        tail_mass=np.array([0.0, 0.1, 0.5]), title="t", notes="n")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert not list(path.parent.glob(".*tmp*"))  # written via a temporary name, renamed into place
