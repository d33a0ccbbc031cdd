"""gold teacher-cache with the hf backend: a tiny random Llama with the real SmolLM2 tokenizer (fast tier).

Every stored number is checked against a fresh teacher forward pass over the stored ids.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from gold_pipeline.data.shards import read_manifest, sample_id
from gold_pipeline.errors import GoldInputError, OutputExistsError
from gold_pipeline.models.generation import cut_at_stop, filter_logprobs, sample_seed
from gold_pipeline.models.loading import tiny_model_for
from gold_pipeline.teacher_cache import TeacherCacheConfig, bytes_per_teacher_token, run_teacher_cache
from gold_pipeline.text.encode import encode_completion, end_of_turn_ids, render_prompt_ids
from gold_pipeline.text.tokenizers import load_tokenizer
from tests.helpers import REPO

TOKENIZER = "pkg:smollm2"
PROMPTS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]},
    {"prompt": "Write a haiku about the sea."},
    {"messages": [{"role": "user", "content": "Translate: é, ü, 中文 and a literal <|im_end|> marker."}]},
    {"messages": [{"role": "user", "content": "Count to five."}]},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def stopping_model(tokenizer):
    """Tiny random Llama whose end-of-turn logit is raised by 9 nats, so some samples stop before the limit."""
    model = tiny_model_for(tokenizer, seed=0)
    eot = end_of_turn_ids(tokenizer)[0]

    def raise_eot(module, inputs, output):
        output = output.clone()
        output[..., eot] += 9.0
        return output

    model.lm_head.register_forward_hook(raise_eot)
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def config(tmp_path: Path, dataset: Path, **overrides) -> TeacherCacheConfig:
    fields = dict(dataset=str(dataset), out=tmp_path / "out", teacher="tiny", teacher_tokenizer=TOKENIZER,
                  top_k=8, max_new_tokens=12, rows_per_shard=2, batch_size=3, max_context=512, progress=False)
    fields.update(overrides)
    return TeacherCacheConfig(**fields)


def read_rows(out: Path) -> list[dict]:
    return pl.read_parquet(str(out / "*.parquet")).sort(["row_index", "generation_index"]).to_dicts()


@torch.no_grad()
def fresh_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """(m, V) teacher log-probs of each completion token from one unbatched forward pass."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(ids).logits[0].float()
    start = len(prompt_ids) - 1
    return torch.log_softmax(logits[start : start + len(completion_ids)], dim=-1)


def check_rows_against_forward(rows: list[dict], model, tokenizer, k: int) -> None:
    stop_ids = {end_of_turn_ids(tokenizer)[0], tokenizer.eos_token_id}
    for row in rows:
        ids = row["teacher_completion_ids"]
        assert len(ids) == len(row["teacher_token_logprobs"]) == len(row["teacher_topk_ids"])
        text_ids = ids[:-1] if row["finish_reason"] == "stop" else ids
        if row["finish_reason"] == "stop":
            assert ids[-1] in stop_ids
        # stored completion ids decode to the stored text
        assert tokenizer.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == \
            row["completion_text"]
        fresh = fresh_logprobs(model, row["teacher_prompt_ids"], ids)                         # (m, V)
        token_lp = np.asarray(row["teacher_token_logprobs"], dtype=np.float32)
        expected = fresh.gather(-1, torch.tensor(ids)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(token_lp, expected, atol=2e-4, rtol=0)                    # float32 storage
        topk_ids = np.asarray(row["teacher_topk_ids"], dtype=np.int64)                        # (m, K)
        topk_lp = np.asarray(row["teacher_topk_logprobs"], dtype=np.float32)                  # (m, K) from float16
        assert topk_ids.shape == (len(ids), k)
        fresh_at_ids = fresh.gather(-1, torch.tensor(topk_ids)).numpy()
        # float16 keeps 11 significant bits: |error| <= |x| * 2**-11 (+ forward noise)
        np.testing.assert_allclose(topk_lp, fresh_at_ids, rtol=2**-10, atol=2e-4)
        assert np.all(np.diff(topk_lp, axis=1) <= 0), "top-k must be sorted descending"
        # the K stored ids really are the K largest: none outside the set beats the smallest inside
        outside = fresh.clone()
        outside.scatter_(-1, torch.tensor(topk_ids), float("-inf"))
        assert np.all(outside.max(-1).values.numpy() <= fresh_at_ids.min(-1) + 1e-5)


# ------------------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------------------


def test_generate_rows_match_fresh_teacher_forward(tmp_path, tokenizer, stopping_model):
    dataset = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    cfg = config(tmp_path, dataset, num_generations=2, temperature=1.0, top_k=8, max_new_tokens=8)
    summary = run_teacher_cache(cfg, model=stopping_model)
    rows = read_rows(cfg.out)
    assert len(rows) == len(PROMPTS) * 2 == summary["rows"]
    reasons = {row["finish_reason"] for row in rows}
    assert reasons == {"stop", "length"}, "the raised end-of-turn logit should make both finish reasons occur"
    check_rows_against_forward(rows, stopping_model, tokenizer, k=8)
    # ids, prompts and sample ids follow the contracts
    for row in rows:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        assert row["sample_id"] == sample_id(messages, row["generation_index"])
        assert row["teacher_prompt_ids"] == render_prompt_ids(tokenizer, messages)
    assert len({row["sample_id"] for row in rows}) == len(rows)
    manifest = read_manifest(cfg.out, kind="teacher")
    assert manifest["num_rows"] == len(rows) and manifest["num_shards"] == 3
    assert manifest["fingerprints"]["teacher_tokenizer"]["sha256"]
    assert manifest["stats"]["finish_reason"]["stop"] + manifest["stats"]["finish_reason"]["length"] == len(rows)


def test_generation_is_seeded_per_sample_not_per_batch(tmp_path, stopping_model):
    dataset = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:4])
    run_teacher_cache(config(tmp_path, dataset, batch_size=4, rows_per_shard=4, top_k=0), model=stopping_model)
    run_teacher_cache(config(tmp_path, dataset, batch_size=1, rows_per_shard=2, top_k=0, out=tmp_path / "b"),
                      model=stopping_model)
    a, b = read_rows(tmp_path / "out"), read_rows(tmp_path / "b")
    assert [r["teacher_completion_ids"] for r in a] == [r["teacher_completion_ids"] for r in b]
    other_seed = config(tmp_path, dataset, seed=1, top_k=0, out=tmp_path / "c")
    run_teacher_cache(other_seed, model=stopping_model)
    assert [r["teacher_completion_ids"] for r in read_rows(tmp_path / "c")] != [r["teacher_completion_ids"] for r in a]


def test_greedy_is_argmax_of_stored_topk(tmp_path, stopping_model):
    dataset = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:2])
    # max_context=None: the context limit comes from the given model's config
    run_teacher_cache(config(tmp_path, dataset, temperature=0.0, top_k=4, max_context=None), model=stopping_model)
    for row in read_rows(tmp_path / "out"):
        assert [k[0] for k in row["teacher_topk_ids"]] == row["teacher_completion_ids"]


def test_score_only_keeps_dataset_completions(tmp_path, tokenizer, stopping_model):
    rows_in = [
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there! 👋"}]},
        {"prompt": "2+2?", "completion": "4, of course."},
    ]
    dataset = write_jsonl(tmp_path / "train.jsonl", rows_in)
    run_teacher_cache(config(tmp_path, dataset, score_only=True, top_k=5), model=stopping_model)
    rows = read_rows(tmp_path / "out")
    eot = end_of_turn_ids(tokenizer)
    for row, source in zip(rows, ["Hi there! 👋", "4, of course."]):
        assert row["completion_text"] == source and row["finish_reason"] == "stop"
        assert row["teacher_completion_ids"] == encode_completion(tokenizer, source) + eot
    check_rows_against_forward(rows, stopping_model, tokenizer, k=5)


def test_top_k_zero_stores_completions_only(tmp_path, stopping_model):
    dataset = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:2])
    run_teacher_cache(config(tmp_path, dataset, top_k=0), model=stopping_model)
    rows = read_rows(tmp_path / "out")
    assert all(r["teacher_topk_ids"] is None and r["teacher_token_logprobs"] is None for r in rows)
    assert all(len(r["teacher_completion_ids"]) > 0 for r in rows)


def test_output_is_readable_as_teacher_cache_source(tmp_path, stopping_model):
    """gold align --teacher-cache reads the output through sources.iter_teacher_cache."""
    from gold_pipeline.data.sources import iter_examples

    dataset = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:3])
    run_teacher_cache(config(tmp_path, dataset, top_k=6), model=stopping_model)
    examples = list(iter_examples(str(tmp_path / "out")))
    assert len(examples) == 3
    for example in examples:
        m = len(example.extra["teacher_completion_ids"])
        assert example.extra["teacher_topk_ids"].shape == (m, 6)
        assert example.extra["teacher_topk_logprobs"].dtype == np.float16


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------


BAD_ROWS = [
    {"messages": [{"role": "system", "content": "only a system turn"}]},          # no user turn
    {"messages": [{"role": "user", "content": "   "}]},                            # empty prompt
    {"messages": [{"role": "user", "content": "word " * 600}]},                    # longer than the context
    {"messages": "not a list"},                                                    # malformed (sources)
]


@pytest.mark.parametrize("bad, fragment", [
    (BAD_ROWS[0], "no user message"), (BAD_ROWS[1], "only empty message"), (BAD_ROWS[2], "too long"),
    (BAD_ROWS[3], "messages"),
])
def test_bad_rows_are_clear_errors(tmp_path, stopping_model, bad, fragment):
    dataset = write_jsonl(tmp_path / "prompts.jsonl", [PROMPTS[0], bad])
    with pytest.raises(GoldInputError, match=fragment) as info:
        run_teacher_cache(config(tmp_path, dataset), model=stopping_model)
    assert "Row 1" in str(info.value) and "--skip-invalid" in str(info.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_rows_are_counted_skips(tmp_path, stopping_model):
    dataset = write_jsonl(tmp_path / "prompts.jsonl", [PROMPTS[0], *BAD_ROWS, PROMPTS[1]])
    run_teacher_cache(config(tmp_path, dataset, skip_invalid=True), model=stopping_model)
    manifest = read_manifest(tmp_path / "out", kind="teacher")
    assert manifest["num_rows"] == 2
    assert manifest["stats"]["skipped"] == {"no_user_turn": 1, "empty_prompt": 1, "prompt_too_long": 1,
                                            "messages_not_a_list": 1}
    assert [r["row_index"] for r in read_rows(tmp_path / "out")] == [0, 5]


@pytest.mark.parametrize("overrides, fragment", [
    ({"top_k": -1}, "--top-k"), ({"top_k": 5000}, "--top-k"), ({"num_generations": 0}, "--num-generations"),
    ({"score_only": True, "num_generations": 2}, "--score-only"), ({"top_p": 0.0}, "--top-p"),
    ({"backend": "openai"}, "--base-url"), ({"resume": True, "overwrite": True}, "exclude"),
])
def test_config_rejects_bad_options(tmp_path, overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        config(tmp_path, tmp_path / "x.jsonl", **overrides)


def test_top_k_above_vocabulary_is_an_error(tmp_path, tokenizer):
    dataset = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1])
    small = tiny_model_for(tokenizer, vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="exceeds the teacher's vocabulary"):
        run_teacher_cache(config(tmp_path, dataset, top_k=1000, max_context=2048), model=_Shrunk(small))


class _Shrunk(torch.nn.Module):
    """A model whose output embedding has 500 rows (to provoke K > V without a huge K)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.head = torch.nn.Linear(4, 500)

    def get_output_embeddings(self):
        return self.head


def test_existing_output_needs_resume_or_overwrite(tmp_path, stopping_model):
    dataset = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:2])
    run_teacher_cache(config(tmp_path, dataset), model=stopping_model)
    with pytest.raises(OutputExistsError, match="--resume"):
        run_teacher_cache(config(tmp_path, dataset), model=stopping_model)
    with pytest.raises(OutputExistsError, match="different settings"):
        run_teacher_cache(config(tmp_path, dataset, resume=True, top_k=3), model=stopping_model)
    summary = run_teacher_cache(config(tmp_path, dataset, resume=True), model=stopping_model)
    assert summary["new_teacher_tokens"] == 0 and summary["rows"] == 2


# ------------------------------------------------------------------------------------------------------------
# resume after a kill, data parallel, CLI
# ------------------------------------------------------------------------------------------------------------

SLOW_RUN = textwrap.dedent("""
    import sys, time
    from gold_pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache
    from gold_pipeline.teacher_cache import hf
    original = hf.HFBackend.run
    def slow_run(self, requests):
        time.sleep(0.4)
        return original(self, requests)
    hf.HFBackend.run = slow_run
    dataset, out, model_dir, resume = sys.argv[1:5]
    run_teacher_cache(TeacherCacheConfig(dataset=dataset, out=out, teacher=model_dir, teacher_tokenizer="pkg:smollm2",
                      top_k=4, max_new_tokens=6, rows_per_shard=1, batch_size=1, num_generations=2,
                      resume=resume == "1", progress=False))
""")


def test_resume_after_kill_gives_the_same_rows(tmp_path, tiny_model_dir):
    prompts = [{"prompt": f"Question number {i}: what is {i} + {i}?"} for i in range(5)]
    dataset = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    script = tmp_path / "run.py"
    script.write_text(SLOW_RUN)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(script), str(dataset), str(killed), str(tiny_model_dir), "0"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = killed / "_gold" / "done"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(done.glob("*.json"))) < 1 and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list(done.glob("*.json")))
    assert 1 <= finished < 5 and not (killed / "manifest.json").exists()
    common = dict(dataset=str(dataset), teacher=str(tiny_model_dir), teacher_tokenizer=TOKENIZER, top_k=4,
                  max_new_tokens=6, rows_per_shard=1, batch_size=1, num_generations=2, progress=False)
    resumed = run_teacher_cache(TeacherCacheConfig(out=killed, resume=True, **common))
    assert resumed["new_teacher_tokens"] < resumed["teacher_tokens"]
    clean = tmp_path / "clean"
    run_teacher_cache(TeacherCacheConfig(out=clean, **common))
    a, b = read_rows(killed), read_rows(clean)
    assert len(a) == len(b) == 10
    assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b]
    for x, y in zip(a, b):
        for key in ("teacher_completion_ids", "teacher_topk_ids", "completion_text", "finish_reason"):
            assert x[key] == y[key], key
        # log-probs computed in the killed subprocess and in this process may differ in the last bits (torch's
        # CPU kernels depend on the thread count); the sampled ids above are identical
        for key in ("teacher_token_logprobs", "teacher_topk_logprobs"):
            np.testing.assert_allclose(np.asarray(x[key], dtype=np.float64), np.asarray(y[key], dtype=np.float64),
                                       rtol=1e-3, atol=1e-4, err_msg=key)
    assert not list(killed.glob(".*.tmp"))


@pytest.mark.slow
def test_two_local_workers_give_the_same_rows(tmp_path, tiny_model_dir):
    dataset = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    base = dict(teacher=str(tiny_model_dir), max_context=None, rows_per_shard=1, batch_size=1, top_k=4)
    run_teacher_cache(config(tmp_path, dataset, **base))
    run_teacher_cache(config(tmp_path, dataset, out=tmp_path / "dp", num_workers=2, **base))
    a, b = read_rows(tmp_path / "out"), read_rows(tmp_path / "dp")
    assert [r["teacher_completion_ids"] for r in a] == [r["teacher_completion_ids"] for r in b]
    manifest = read_manifest(tmp_path / "dp", kind="teacher")
    assert manifest["num_shards"] == len(PROMPTS) and manifest["num_rows"] == len(PROMPTS)


def test_cli_teacher_cache(tmp_path, tiny_model_dir):
    from gold_pipeline.cli.main import app
    dataset = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:3])
    args = ["teacher-cache", "--dataset", str(dataset), "--teacher", str(tiny_model_dir), "--teacher-tokenizer",
            TOKENIZER, "--top-k", "4", "--max-new-tokens", "5", "--out", str(tmp_path / "cli"), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["rows"] == 3 and summary["teacher_tokens"] == 15
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output  # one sentence naming the fix, no traceback
    assert "Traceback" not in again.output


# ------------------------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------------------------


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 2, 9], {2}, 10) == ([5, 6, 2], "stop")
    assert cut_at_stop([5, 6, 7], {2}, 10) == ([5, 6, 7], "length")
    assert cut_at_stop([5, 6, 7, 2], {2}, 3) == ([5, 6, 7], "length")


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "a") == sample_seed(0, "a")
    assert len({sample_seed(0, "a"), sample_seed(1, "a"), sample_seed(0, "b")}) == 3


def test_filter_logprobs_top_k_and_top_p():
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logprobs(logprobs, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logprobs(logprobs, top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]        # 0.5 < 0.75 <= 0.8
    assert (~torch.isinf(filter_logprobs(logprobs, top_p=0.1))).sum() == 1


def test_bytes_per_teacher_token_budget():
    assert bytes_per_teacher_token(16) == 104
    assert bytes_per_teacher_token(64) == 392 <= 400


# ------------------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct (slow tier)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_rows_match_fresh_forward_and_resume(tmp_path, tokenizer):
    from gold_pipeline.models.loading import load_model

    teacher = "pkg:smollm2-135m-instruct"
    model = load_model(teacher)
    prompts = [{"prompt": "What is 2+2? Answer with a number only."}, PROMPTS[1], PROMPTS[3]]
    dataset = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    common = dict(teacher=teacher, teacher_tokenizer=None, top_k=16, max_new_tokens=20, temperature=0.0,
                  rows_per_shard=1, batch_size=2, max_context=None)
    run_teacher_cache(config(tmp_path, dataset, **common), model=model)
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 3 and rows[0]["finish_reason"] == "stop"     # greedy "2 + 2 = 4" then end-of-turn
    check_rows_against_forward(rows, model, tokenizer, k=16)
    # a lost shard (as after a kill) is redone identically on --resume
    (tmp_path / "out" / "part-00001.parquet").unlink()
    (tmp_path / "out" / "_gold" / "done" / "part-00001.json").unlink()
    (tmp_path / "out" / "manifest.json").unlink()
    summary = run_teacher_cache(config(tmp_path, dataset, resume=True, **common), model=model)
    assert 0 < summary["new_teacher_tokens"] < summary["teacher_tokens"]
    assert read_rows(tmp_path / "out") == rows
