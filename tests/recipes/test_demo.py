"""gold demo: golden values of its metrics, a fast end-to-end run on a tiny teacher built from a config, and
(slow tier) the real `gold demo` as `make demo` runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gold_pipeline.recipes.demo import (
    DemoConfig,
    build_student,
    format_summary,
    gap_closed,
    run_demo,
    student_bits_per_byte,
    teacher_bits_per_byte,
)
from tests.helpers import REPO

TEACHER = "pkg:smollm2-135m-instruct"  # its tokenizer; the fast test passes a tiny model built from a config
STUDENT_TOKENIZER = "pkg:mistral-sp-v1"
TINY_STUDENT = dict(student_hidden_size=32, student_layers=1, student_heads=2, student_intermediate_size=64)


@pytest.fixture(scope="module")
def pair():
    from gold_pipeline.text.pair import TokenizerPair
    from gold_pipeline.text.tokenizers import load_tokenizer

    return TokenizerPair.build(load_tokenizer(STUDENT_TOKENIZER), load_tokenizer("pkg:smollm2"))


def _row(pair, text: str, **extra) -> dict:
    from gold_pipeline.text.encode import encode_completion

    s_ids = list(encode_completion(pair.student_tokenizer, text)) + pair.student_eot_ids
    t_ids = list(encode_completion(pair.teacher_tokenizer, text)) + pair.teacher_eot_ids
    return {"sample_id": "x", "completion_text": text, "student_prompt_ids": [1, 2], "teacher_prompt_ids": [3],
            "student_completion_ids": s_ids, "teacher_completion_ids": t_ids,
            "student_group_ids": [0] * (len(s_ids) - 1) + [-1], "teacher_group_ids": [0] * (len(t_ids) - 1) + [-1],
            "num_groups": 1, **extra}


def test_uniform_student_has_log2_vocab_bits_per_token(pair):
    # A student whose logits are all zero predicts every token with probability 1/V: its bits per byte are
    # log2(V) * (text tokens) / (text bytes); the end-of-turn token carries no bytes and is left out.
    student = build_student(pair.student_tokenizer, hidden_size=16, layers=1, heads=2, intermediate_size=32, seed=0)
    torch.nn.init.zeros_(student.lm_head.weight)
    rows = [_row(pair, "The café costs 12 €."), _row(pair, "x = 7 × 8")]
    result = student_bits_per_byte(student, rows, pair, batch_size=1)
    text_tokens = sum(len(r["student_completion_ids"]) - 1 for r in rows)
    text_bytes = sum(len(r["completion_text"].encode()) for r in rows)
    assert result["tokens"] == text_tokens and result["bytes"] == text_bytes
    assert result["bits_per_byte"] == pytest.approx(math.log2(len(pair.student_tokenizer)) * text_tokens / text_bytes,
                                                    rel=1e-5)


def test_teacher_bits_per_byte_sums_cached_logprobs_without_end_of_turn(pair):
    row = _row(pair, "abcd")  # 4 bytes
    n = len(row["teacher_completion_ids"])
    row["teacher_token_logprobs"] = [-math.log(2)] * (n - 1) + [-100.0]  # 1 bit per text token; eot ignored
    assert teacher_bits_per_byte([row], pair)["bits_per_byte"] == pytest.approx((n - 1) / 4)
    with pytest.raises(ValueError, match="teacher_token_logprobs"):
        teacher_bits_per_byte([_row(pair, "abcd")], pair)


def test_gap_closed():
    assert gap_closed(5.0, 3.0, 1.0) == pytest.approx(0.5)
    assert gap_closed(5.0, 6.0, 1.0) == pytest.approx(-0.25)
    assert gap_closed(1.0, 0.5, 1.0) is None  # no gap to close


def test_config_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="train-prompts"):
        DemoConfig(out=tmp_path, train_prompts=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="--steps"):
        DemoConfig(out=tmp_path, steps=0, mixed_steps=0)
    with pytest.raises(ValueError, match="multiple"):
        DemoConfig(out=tmp_path, student_hidden_size=30, student_heads=4)


def _prompts(path: Path, questions: list[str]) -> str:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in questions))
    return str(path)


def test_demo_pipeline_on_a_tiny_teacher(tmp_path, capsys):
    from gold_pipeline.models.loading import tiny_model_for
    from gold_pipeline.text.tokenizers import load_tokenizer

    teacher = tiny_model_for(load_tokenizer("pkg:smollm2"), seed=1, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    cfg = DemoConfig(
        out=tmp_path / "demo", teacher=TEACHER, student_tokenizer=STUDENT_TOKENIZER,
        train_prompts=_prompts(tmp_path / "train.jsonl", ["What is 12 × 7?", "Say hi in 中文.", "Name a café."]),
        heldout_prompts=_prompts(tmp_path / "heldout.jsonl", ["What is 3 + 4?", "Spell naïve."]),
        max_new_tokens=8, top_k=4, teacher_batch_size=2, steps=3, mixed_steps=1, batch_size=2,
        learning_rate=1e-2, progress=False, **TINY_STUDENT,
    )
    summary = run_demo(cfg, teacher_model=teacher)

    out = tmp_path / "demo"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    for stage in ("teacher_train", "teacher_heldout", "aligned_train", "aligned_heldout"):
        assert (out / stage / "manifest.json").exists()
    assert summary["train_rows"] == 3 and summary["heldout_rows"] == 2
    assert summary["alignment"]["rows"] == 3 and summary["alignment"]["groups"] > 0
    assert set(summary["train"]) == {"off-policy (cached top-K)", "mixed (lmbda=0.5)"}
    assert [p["steps"] for p in summary["train"].values()] == [3, 1]
    bpb = summary["bpb"]
    assert all(math.isfinite(bpb[k]) and bpb[k] > 0 for k in ("student_before", "student_after", "teacher"))
    assert bpb["student_after"] != bpb["student_before"]  # the student was trained
    assert {"teacher-cache", "align", "train off-policy", "train mixed", "total"} <= set(summary["seconds"])
    assert 0.0 <= summary["topk_tail_mass_mean"] <= 1.0
    text = format_summary(summary)
    assert "bits/byte on held-out teacher completions" in text and "report.png" in text

    # Reruns replace the previous demo output (overwrite semantics) instead of refusing it.
    again = run_demo(DemoConfig(**{**cfg.to_dict(), "steps": 1, "mixed_steps": 0}), teacher_model=teacher)
    assert list(again["train"]) == ["off-policy (cached top-K)"] and again["train_rows"] == 3


@pytest.mark.slow
def test_make_demo_command_runs_the_real_pipeline_in_budget(tmp_path):
    """What `make demo` runs, on the real SmolLM2-135M-Instruct teacher (under 15 minutes on 2 cores)."""
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "gold_pipeline.cli", "demo", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "bits/byte on held-out teacher completions" in proc.stdout
    assert summary["bpb"]["student_after"] < summary["bpb"]["student_before"] - 0.5
    assert summary["alignment"]["rows_by_status"].get("ok", 0) >= 0.9 * summary["alignment"]["rows"]
    assert (out / "report.png").stat().st_size > 10_000
    assert summary["seconds"]["total"] < 900
