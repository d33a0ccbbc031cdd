"""gold_pipeline.recipes.report: golden values of the pure pieces (group sizes, tail mass, metric series, panel
selection, labels, figure size), and reports of a tiny training run, an aligned folder and a teacher cache: the
panels drawn, the PNG's size and the self-contained HTML."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from matplotlib.image import imread

from gold_pipeline.errors import GoldInputError
from gold_pipeline.recipes.inspect import group_size_counts, inspect_output, sizes_per_group
from gold_pipeline.recipes.report import (
    Panel,
    capped_counts,
    draw_panels,
    figure_pixels,
    folder_kind,
    grid_shape,
    group_sizes,
    loss_curve,
    plain_label,
    read_metrics,
    tail_mass_from_logprobs,
    tail_mass_histogram,
    training_panels,
    write_report,
)
from tests.helpers import CONVERSATIONS, DEMO_DATA, STUDENT_TOKENIZER, TEACHER_TOKENIZER

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces.
# ---------------------------------------------------------------------------------------------------------------


def test_group_sizes_count_tokens_per_group_across_rows():
    # row 0: groups 0,0,1 ; row 1: 0,1,1,1,-1 (the excluded token is no group) ; row 2: empty
    group_ids = np.array([0, 0, 1, 0, 1, 1, 1, -1], dtype=np.int32)
    sizes = sizes_per_group(group_ids, np.array([3, 5, 0]), np.array([2, 2, 0]))
    assert sizes.tolist() == [2, 1, 1, 3]
    assert group_size_counts(sizes) == [2, 1, 1]  # two groups of 1 token, one of 2, one of 3
    assert sizes_per_group(np.zeros(0, dtype=np.int32), np.array([0, 0]), np.array([0, 0])).tolist() == []
    assert group_size_counts(np.zeros(0, dtype=np.int64)) == []


def test_capped_counts_fold_large_groups_into_the_last_bin():
    assert capped_counts([5, 4, 3, 2, 1], cap=3) == [5, 4, 6]
    assert capped_counts([5, 4, 3], cap=3) == [5, 4, 3]
    assert capped_counts([5], cap=3) == [5]


def test_tail_mass_is_one_minus_topk_mass():
    logprobs = np.log(np.array([[0.5, 0.25], [0.9, 0.1], [0.7, 0.30000001]]))  # (N=3, K=2)
    np.testing.assert_allclose(tail_mass_from_logprobs(logprobs), [0.25, 0.0, 0.0], atol=1e-6)
    assert (tail_mass_from_logprobs(logprobs) >= 0).all()  # rounding past 1 is clipped


def test_tail_mass_histogram_bins_over_zero_to_one():
    centres, counts = tail_mass_histogram(np.array([0.0, 0.1, 0.26, 1.0]), bins=4)
    assert centres == [0.125, 0.375, 0.625, 0.875] and counts == [2, 1, 0, 1]


def _write_metrics(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_loss_curve_reads_only_records_with_the_key(tmp_path):
    path = _write_metrics(tmp_path / "metrics.jsonl",
                          [{"step": 1, "loss": 2.0}, {"step": 1, "train_runtime": 3.0}, {"step": 2, "loss": 1.5}])
    steps, values = loss_curve(path)
    assert steps.tolist() == [1, 2] and values.tolist() == [2.0, 1.5]
    assert loss_curve(tmp_path / "missing.jsonl")[0].size == 0


def test_metrics_line_still_being_written_is_left_out_and_a_damaged_one_is_named(tmp_path):
    path = _write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 2.0}], tail='{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(GoldInputError, match="line 2"):
        read_metrics(path)


def test_training_panels_leave_out_absent_and_repeated_metrics_and_keep_new_ones():
    records = [{"step": s, "epoch": s / 4, "loss": 1.0 / s, "distillation_loss": round(1.0 / s, 6),
                "matched_loss": 0.1, "unmatched_loss": 0.2, "off_policy_loss": 1.0 / s, "short_batches": 1}
               for s in (1, 2, 3)]
    records.append({"step": 3, "eval_bits_per_byte": 4.5, "eval_runtime": 0.1})
    records.append({"step": 3, "train_runtime": 1.0, "train_loss": 0.6})
    panels = training_panels(records)
    # distillation_loss == loss: "loss parts" would repeat the loss curve; no eval_loss, tokens/s, ...: no panel
    assert [p.title for p in panels] == ["training loss", "hybrid loss: matched / unmatched vocabulary",
                                         "eval bits per byte", "short_batches"]
    assert panels[1].series == {"matched_loss": ([1.0, 2.0, 3.0], [0.1, 0.1, 0.1]),
                                "unmatched_loss": ([1.0, 2.0, 3.0], [0.2, 0.2, 0.2])}
    assert panels[2].series == {"eval_bits_per_byte": ([3.0], [4.5])}
    # a second loss part makes the parts panel worth drawing
    with_ce = [dict(r, crossentropy_loss=0.5) if "loss" in r else r for r in records]
    assert "loss parts" in [p.title for p in training_panels(with_ce)]


def test_plain_label_escapes_mathtext_and_glyphs_the_font_lacks():
    drawable = frozenset(map(ord, "'$\\ab c"))
    assert plain_label("a $b", drawable) == r"'a \$b'"
    assert plain_label("a中", drawable) == "'a\\u4e2d'"


def test_grid_and_figure_size():
    assert [grid_shape(n) for n in (1, 2, 3, 4, 5, 7, 11)] == [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3), (4, 3)]
    assert figure_pixels(3) == (360, 1500)
    assert figure_pixels(4, title=True, notes=True) == (2 * 360 + 50 + 30, 1000)


def test_draw_panels_writes_a_png_of_the_stated_size(tmp_path):
    panels = [Panel("a line", "step", "loss", {"loss": ([1, 2, 3], [1.0, 0.5, 0.25])}),
              Panel("bars", "size", "groups", {"s": ([1, 2], [10, 1]), "t": ([1, 2], [9, 2])}, style="bar", log_y=True),
              Panel("names", "count", "", {"n": (["'x $1'", "'y'"], [3, 1])}, style="barh"),
              Panel("empty line", "step", "loss", {"loss": ([], [])})]
    path = tmp_path / "sub" / "report.png"
    titles = draw_panels(panels, path, title="t", notes="n")
    assert titles == ["a line", "bars", "names", "empty line"]
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert imread(path).shape[:2] == figure_pixels(4, title=True, notes=True) == (800, 1000)
    assert not list(path.parent.glob(".*tmp*"))  # written via a temporary name, renamed into place


# ---------------------------------------------------------------------------------------------------------------
# Reports of real folders.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """A finished tiny training run with an eval split: on- and off-policy slices (seed 0), metrics.jsonl."""
    from gold_pipeline.training import GOLDTrainer
    from tests.helpers import gold_args, tiny_model, tokenizer

    out = tmp_path_factory.mktemp("report") / "run"
    args = gold_args(out, max_steps=2, lmbda=0.5, eval_strategy="steps", eval_steps=1, max_completion_length=8)
    trainer = GOLDTrainer(model=tiny_model(STUDENT_TOKENIZER, 0), teacher_model=tiny_model(TEACHER_TOKENIZER, 1),
                          args=args, train_dataset=CONVERSATIONS, eval_dataset=CONVERSATIONS[:2],
                          processing_class=tokenizer(STUDENT_TOKENIZER),
                          teacher_processing_class=tokenizer(TEACHER_TOKENIZER))
    trainer.train()
    return out


def test_training_run_report_has_its_panels_and_a_self_contained_page(train_run):
    result = write_report(train_run)
    assert result.png == train_run / "report.png" and result.html == train_run / "report.html"
    assert folder_kind(train_run) == "train"
    expected = ["training loss", "hybrid loss: matched / unmatched vocabulary", "loss by policy",
                "excluded-token share", "eval bits per byte", "eval loss", "throughput", "on-policy share",
                "learning rate", "gradient norm", "generated tokens (on-policy samples)"]
    assert result.titles == expected
    assert imread(result.png).shape[:2] == figure_pixels(len(expected), title=True) == (4 * 360 + 50, 1500)
    by_title = {panel.title: panel for panel in result.figures.panels}
    assert set(by_title["loss by policy"].series) == {"off_policy_loss", "on_policy_loss"}
    assert by_title["eval bits per byte"].series["eval_bits_per_byte"][0] == [1.0, 2.0]
    table = result.figures.table
    assert table["last_step"] == 2 and table["loss_min"] <= table["loss_first"]
    assert 0 < table["on_policy_share_mean"] < 1 and table["eval_bits_per_byte_last"] > 0

    page = result.html.read_text()
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)) == result.png.read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere
    assert "<th>last_step</th><td>2</td>" in page and "eval_bits_per_byte" in page


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    from gold_pipeline.align.config import AlignConfig
    from gold_pipeline.align.job import run_align

    folder = tmp_path_factory.mktemp("report")
    rows = folder / "rows.jsonl"
    rows.write_text("".join((DEMO_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines(True)[:8]))
    run_align(AlignConfig(out=str(folder / "aligned"), dataset=str(rows), student_tokenizer=STUDENT_TOKENIZER,
                          teacher_tokenizer=TEACHER_TOKENIZER, shard_size=3, progress=False))
    return folder / "aligned"


def test_aligned_report_draws_gold_inspect_numbers(aligned):
    result = write_report(aligned, html_page=False)
    assert result.html is None and not (aligned / "report.html").exists()
    report = inspect_output(aligned, top=10)
    groups = report["groups"]
    # no teacher top-K in an aligned folder made from a dataset: no tail-mass panel
    assert result.titles == [f"group sizes ({groups} groups)", "most frequent multi-token groups (first 8 rows)"]
    sizes, top = result.figures.panels
    for side, (x, counts) in zip(("student", "teacher"), sizes.series.values()):
        assert sum(counts) == groups
        assert sum(n * c for n, c in zip(x, counts)) == report[side]["grouped_tokens"]  # no group above the cap
    labels, counts = top.series["groups"]
    assert counts == [entry["count"] for entry in report["top_multi_token_groups"]]
    assert labels[0].startswith(repr(report["top_multi_token_groups"][0]["text"]))
    assert result.figures.table["groups"] == groups == len(group_sizes(aligned)["student"])
    assert imread(result.png).shape[:2] == figure_pixels(2, title=True)


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory):
    from gold_pipeline.models.loading import tiny_model_for
    from gold_pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache
    from tests.helpers import tokenizer

    folder = tmp_path_factory.mktemp("report")
    teacher = tiny_model_for(tokenizer(TEACHER_TOKENIZER), seed=1, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    run_teacher_cache(TeacherCacheConfig(dataset=str(DEMO_DATA / "train.jsonl"), out=folder / "teacher",
                                         teacher="pkg:smollm2-135m-instruct", top_k=4, max_new_tokens=6,
                                         batch_size=4, max_examples=4, progress=False, device="cpu"), model=teacher)
    return folder / "teacher"


def test_teacher_cache_and_its_aligned_folder_show_the_tail_mass(teacher_cache, tmp_path):
    from gold_pipeline.align.config import AlignConfig
    from gold_pipeline.align.job import run_align

    result = write_report(teacher_cache)
    tokens = result.figures.table["teacher_tokens"]
    assert result.titles == [f"top-K tail mass ({tokens} teacher tokens)", "finish reasons (4 rows)"]
    tail, finish = result.figures.panels
    (centres, counts), = tail.series.values()
    assert len(centres) == 40 and sum(counts) == tokens == result.figures.table["teacher_tokens_with_topk"]
    assert sum(finish.series["rows"][1]) == 4

    aligned = tmp_path / "aligned_tc"
    run_align(AlignConfig(out=str(aligned), teacher_cache=str(teacher_cache), student_tokenizer=STUDENT_TOKENIZER,
                          progress=False))
    titles = write_report(aligned).titles
    assert titles[0].startswith("group sizes") and titles[-1] == f"top-K tail mass ({tokens} teacher tokens)"


def test_a_folder_that_is_no_gold_output_is_refused_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(GoldInputError, match=re.escape(str(tmp_path)) + ".*gold train.*manifest.json"):
        write_report(tmp_path)
    with pytest.raises(GoldInputError, match="is not a folder"):
        folder_kind(tmp_path / "notes.txt")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(GoldInputError, match="holds no metrics yet"):
        write_report(tmp_path)
