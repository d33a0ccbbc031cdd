"""`gold report`: on a finished `gold train` run it writes DIR/report.png and DIR/report.html (or --out, --no-html),
prints the figures with --json, and refuses a folder that is no gold output with one line and exit code 2."""

import json

import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from gold_pipeline.cli.main import app
from gold_pipeline.recipes.report import figure_pixels
from tests.helpers import CONVERSATIONS, STUDENT_TOKENIZER, TEACHER_TOKENIZER, tiny_model, tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`gold train` on two local tiny models and raw conversations: 3 off-policy steps, an eval split."""
    tmp = tmp_path_factory.mktemp("report_cli")
    models = {}
    for name, seed in ((STUDENT_TOKENIZER, 0), (TEACHER_TOKENIZER, 1)):
        models[name] = tmp / name.replace("pkg:", "")
        tiny_model(name, seed).save_pretrained(str(models[name]))
        tokenizer(name).save_pretrained(str(models[name]))
    data = tmp / "conversations.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    out = tmp / "run"
    result = CliRunner().invoke(app, [
        "train", "--student", str(models[STUDENT_TOKENIZER]), "--teacher", str(models[TEACHER_TOKENIZER]),
        "--dataset", str(data), "--eval-dataset", str(data), "--eval-steps", "3", "--output-dir", str(out),
        "--use-uld-loss", "--uld-use-hybrid-loss", "--max-steps", "3",
        "--set", "per_device_train_batch_size=2", "--set", "max_completion_length=8", "--set", "logging_steps=1",
        "--set", "save_strategy='no'", "--set", "use_cpu=true", "--set", "report_to=none", "--set", "lmbda=0.0"])
    assert result.exit_code == 0, result.output
    return out


def test_report_of_a_training_run_writes_png_and_html(run):
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    png, page = run / "report.png", run / "report.html"
    assert f"png   {png}" in result.output and f"html  {page}" in result.output
    assert "training loss" in result.output and "eval bits per byte" in result.output
    pixels = imread(png).shape[:2]
    assert pixels == figure_pixels(9, title=True) == (3 * 360 + 50, 1500)  # 9 panels (lmbda = 0), 3 x 3
    assert "data:image/png;base64," in page.read_text()


def test_json_prints_the_figures_and_out_moves_the_png(run, tmp_path):
    out = tmp_path / "elsewhere" / "picture.png"
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(out), "--no-html", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["kind"] == "train" and figures["png"] == str(out) and figures["html"] is None
    titles = [panel["title"] for panel in figures["panels"]]
    assert titles[0] == "training loss" and "eval bits per byte" in titles
    # lmbda = 0: no generated tokens, and the off-policy loss is the loss (not drawn twice)
    assert "generated tokens (on-policy samples)" not in titles and "loss by policy" not in titles
    loss = figures["panels"][0]["series"]["loss"]
    assert loss["x"] == [1.0, 2.0, 3.0] and len(loss["y"]) == 3
    assert figures["table"]["last_step"] == 3
    assert out.exists() and not out.with_suffix(".html").exists()
    assert imread(out).shape[:2] == figure_pixels(len(titles), title=True)


def test_a_folder_that_is_no_gold_output_exits_2_with_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("GOLD_DEBUG", raising=False)
    (tmp_path / "notes.txt").write_text("x")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    message = result.output.strip()
    assert "\n" not in message and "Traceback" not in message
    assert str(tmp_path) in message and "gold train" in message and "manifest.json" in message
    assert not (tmp_path / "report.png").exists()
