"""OpenAI-compatible backend: request building and response parsing (fast), retries against a local stub, and the
real llama.cpp server (llama-cpp-python serving the packaged SmolLM2 GGUF) checked against transformers (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler

import numpy as np
import polars as pl
import pytest
import torch

from gold_pipeline.errors import BackendUnavailable
from gold_pipeline.teacher_cache.base import TeacherRequest
from gold_pipeline.teacher_cache.openai import (
    LOGPROBS_MARGIN,
    OpenAIBackend,
    RowMappingError,
    ServerResponseError,
    build_completion_request,
    build_piece_table,
    parse_completion_response,
)
from gold_pipeline.text.encode import encode_completion, end_of_turn_ids, render_prompt_ids
from gold_pipeline.text.tokenizers import load_tokenizer
from tests.helpers import free_loopback_port, loopback_server

TOKENIZER = "pkg:smollm2"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def table(tokenizer):
    return build_piece_table(tokenizer)


def request_for(tokenizer, text="What is 2+2?", seed=7) -> TeacherRequest:
    ids = render_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    return TeacherRequest(sample_id="s0", prompt_ids=ids, seed=seed,
                          prompt_text=tokenizer.decode(ids, skip_special_tokens=False))


def llama_cpp_style(tokenizer, text: str, finish: str, k: int, extra_keys: dict | None = None) -> dict:
    """A response shaped like llama-cpp-python's: token strings, string-keyed maps, no stop token."""
    ids = encode_completion(tokenizer, text)
    pieces = [tokenizer.decode([i]) for i in ids]
    top = []
    for position, piece in enumerate(pieces):
        entry = {piece: -0.5}
        for j in range(k + LOGPROBS_MARGIN - 1):
            entry[f"alt{position}_{j}"] = -1.0 - j            # not real pieces: unnamed, dropped
        entry.update({" the": -0.9, " a": -1.3, "": -0.7})   # "" = specials/partial bytes: ambiguous
        entry.update(extra_keys or {})
        top.append(entry)
    return {"choices": [{"text": text, "finish_reason": finish, "logprobs": {
        "tokens": pieces, "token_logprobs": [-0.5] * len(pieces), "top_logprobs": top,
        "text_offset": list(range(len(pieces)))}}]}


# ------------------------------------------------------------------------------------------------------------
# requests and parsing (fast)
# ------------------------------------------------------------------------------------------------------------


def test_build_completion_request(tokenizer):
    request = request_for(tokenizer)
    body = build_completion_request(request, model="m", top_k=16, temperature=0.7, top_p=0.9, sampling_top_k=0,
                                    max_new_tokens=32, prompt_as="ids", stop_ids=[2], logprobs_margin=4)
    assert body["prompt"] == request.prompt_ids and body["logprobs"] == 20 and body["max_tokens"] == 32
    assert body["echo"] is False and body["seed"] == 7 and body["temperature"] == 0.7
    assert body["repeat_penalty"] == 1.0 and body["min_p"] == 0.0          # llama.cpp would sample otherwise
    assert body["return_tokens_as_token_ids"] is True
    text = build_completion_request(request, model="m", top_k=0, temperature=0, top_p=1, sampling_top_k=0,
                                    max_new_tokens=8, prompt_as="text", stop_ids=[2])
    assert text["prompt"] == request.prompt_text and text["logprobs"] == 1
    json.dumps(body)


def test_parse_llama_cpp_response(tokenizer, table):
    text = "Four. It is 4 — café"
    response = llama_cpp_style(tokenizer, text, "stop", k=3)
    result = parse_completion_response(response, k=3, tokenizer=tokenizer, table=table, stop_ids=[2],
                                       sample_id="s0")
    ids = encode_completion(tokenizer, text)
    assert result.completion_ids == ids and result.finish_reason == "stop" and result.completion_text == text
    assert result.stats["openai_stop_token_unscored"] == 1      # llama.cpp does not report the stop token
    the, a = tokenizer.encode(" the", add_special_tokens=False), tokenizer.encode(" a", add_special_tokens=False)
    assert result.topk_ids.shape == (len(ids), 3)
    assert result.topk_ids[:, 0].tolist() == ids                 # the actual token (-0.5) is the most likely
    assert result.topk_ids[:, 1].tolist() == the * len(ids)
    assert result.topk_ids[:, 2].tolist() == a * len(ids)
    np.testing.assert_allclose(result.topk_logprobs[0], [-0.5, -0.9, -1.3])
    assert result.stats["openai_topk_unnamed"] > 0 and "openai_topk_padded" not in result.stats


def test_parse_pads_when_too_few_named_alternatives(tokenizer, table):
    response = llama_cpp_style(tokenizer, "Hi", "length", k=8)
    result = parse_completion_response(response, k=8, tokenizer=tokenizer, table=table, stop_ids=[2],
                                       sample_id="s0")
    assert (result.topk_ids[:, 3:] == -1).all() and np.isneginf(result.topk_logprobs[:, 3:]).all()
    assert result.stats["openai_topk_padded"] == 5 * len(result.completion_ids)


def test_parse_vllm_token_id_response_with_stop_token(tokenizer, table):
    ids = encode_completion(tokenizer, "Blue.") + [2]
    top = [{f"token_id:{i}": -0.1, "token_id:5": -3.0, "token_id:6": -4.0} for i in ids]
    response = {"choices": [{"text": "Blue.", "finish_reason": "stop", "logprobs": {
        "tokens": [f"token_id:{i}" for i in ids], "token_logprobs": [-0.1] * len(ids), "top_logprobs": top}}]}
    result = parse_completion_response(response, k=3, tokenizer=tokenizer, table=table, stop_ids=[2],
                                       sample_id="s0")
    assert result.completion_ids == ids and "openai_stop_token_unscored" not in result.stats
    assert result.topk_ids[:, 0].tolist() == ids and (result.topk_ids[:, 1] == 5).all()


def test_parse_errors(tokenizer, table):
    kwargs = dict(k=4, tokenizer=tokenizer, table=table, stop_ids=[2], sample_id="s0")
    no_logprobs = {"choices": [{"text": "Hi", "finish_reason": "length", "logprobs": None}]}
    with pytest.raises(ServerResponseError, match="no log-probs"):
        parse_completion_response(no_logprobs, **kwargs)
    few = llama_cpp_style(tokenizer, "Hi there", "length", k=0)
    for entry in few["choices"][0]["logprobs"]["top_logprobs"]:
        for key in list(entry)[2:]:
            del entry[key]
    with pytest.raises(ServerResponseError, match="fewer than --top-k 4"):
        parse_completion_response(few, **kwargs)
    wrong = llama_cpp_style(tokenizer, "Hello world", "length", k=4)
    wrong["choices"][0]["logprobs"]["tokens"] = ["Hel", "lo", " wor\u00a7ld"]
    with pytest.raises(RowMappingError, match="does not re-tokenize"):
        parse_completion_response(wrong, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# retries, fallbacks (a local stub standing in for a flaky server; the real server is tested below)
# ------------------------------------------------------------------------------------------------------------


class _Stub(BaseHTTPRequestHandler):
    script: list = []          # per call: (status, body) or a callable(request json) -> (status, body)
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        step = type(self).script.pop(0) if len(type(self).script) > 1 else type(self).script[0]
        status, payload = step(body) if callable(step) else step
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def stub():
    _Stub.seen = []
    with loopback_server(_Stub) as server:
        yield server


def backend_for(server, tokenizer, **kwargs) -> OpenAIBackend:
    return OpenAIBackend(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="m", tokenizer=tokenizer,
                         top_k=3, stop_ids=[2], backoff_s=0.01, **kwargs)


def test_retries_then_succeeds(stub, tokenizer):
    good = llama_cpp_style(tokenizer, "Four.", "stop", k=3)
    _Stub.script = [(503, {"error": "busy"}), (500, {"error": "oops"}), (200, good)]
    results = backend_for(stub, tokenizer, max_retries=3).run([request_for(tokenizer)])
    assert results[0].completion_ids == encode_completion(tokenizer, "Four.") and len(_Stub.seen) == 3


def test_server_gone_is_a_resumable_stop(stub, tokenizer):
    _Stub.script = [(503, {"error": "down"})]
    with pytest.raises(BackendUnavailable, match="did not answer after 2 retries"):
        backend_for(stub, tokenizer, max_retries=2).run([request_for(tokenizer)])


def test_client_error_is_not_retried(stub, tokenizer):
    _Stub.script = [(400, {"error": "logprobs must be <= 20"})]
    backend = backend_for(stub, tokenizer, max_retries=3)
    backend.logprobs_margin = 0
    with pytest.raises(ServerResponseError, match="HTTP 400.*logprobs"):
        backend.run([request_for(tokenizer)])
    assert len(_Stub.seen) == 1


def test_text_prompt_fallback_and_margin_fallback(stub, tokenizer):
    good = llama_cpp_style(tokenizer, "Four.", "length", k=3)

    def answer(body):
        if isinstance(body["prompt"], list):
            return 500, {"error": {"message": "validation error: prompt should be a valid string"}}
        if body["logprobs"] > 3:
            return 400, {"error": {"message": "requested logprobs 7 > max_logprobs 3"}}
        return 200, good

    _Stub.script = [answer]
    results = backend_for(stub, tokenizer).run([request_for(tokenizer)])
    assert results[0].finish_reason == "length"
    assert [isinstance(b["prompt"], list) for b in _Stub.seen] == [True, False, False]
    assert [b["logprobs"] for b in _Stub.seen] == [7, 7, 3]


def test_unmappable_row_is_skipped_with_skip_invalid(stub, tokenizer):
    bad = llama_cpp_style(tokenizer, "Hello world", "length", k=3)
    bad["choices"][0]["logprobs"]["tokens"] = ["Hel", "lo", " wor\u00a7ld"]
    _Stub.script = [(200, bad)]
    assert backend_for(stub, tokenizer, skip_invalid=True).run([request_for(tokenizer)]) == [None]
    with pytest.raises(RowMappingError, match="Sample s0.*--skip-invalid"):
        backend_for(stub, tokenizer).run([request_for(tokenizer)])


# ------------------------------------------------------------------------------------------------------------
# the real llama.cpp server (slow tier)
# ------------------------------------------------------------------------------------------------------------

# Q4_1 weights are the same numbers on both sides (transformers dequantizes them), but llama.cpp multiplies with
# 8-bit-quantized activations: measured here |Δ log-prob| mean 0.07, p95 0.24, max 0.36 nats over 91 tokens.
LLAMA_CPP_MEAN_TOL = 0.2      # nats, mean |server - transformers| over stored log-probs
LLAMA_CPP_MAX_TOL = 1.5       # nats, any single value


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                        "'llama-cpp-python[server]==0.3.36'); the real-server test needs it")
    pytest.importorskip("uvicorn", reason="llama-cpp-python's server extra is missing (pip install "
                        "'llama-cpp-python[server]==0.3.36')")
    from gold_pipeline.models.loading import PKG_MODELS

    gguf = PKG_MODELS["pkg:smollm2-135m-instruct"].gguf_path()
    port = free_loopback_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"   # a file, not a pipe: a full pipe blocks it
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
             str(port), "--n_ctx", "2048"], stdout=handle, stderr=subprocess.STDOUT)
    import requests

    deadline = time.monotonic() + 180
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"llama.cpp server did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/v1"
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.slow
def test_llama_cpp_server_matches_transformers(tmp_path, llama_server, tokenizer):
    from gold_pipeline.models.loading import load_model
    from gold_pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

    prompts = [{"prompt": "What is the capital of France?"}, {"prompt": "Name three fruits."},
               {"prompt": "Write one sentence about the sea."}, {"prompt": "Say 'ok'."}]
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    k = 8
    cfg = TeacherCacheConfig(dataset=str(dataset), out=tmp_path / "out", teacher="smollm2",
                             teacher_tokenizer=TOKENIZER, backend="openai", base_url=llama_server, top_k=k,
                             temperature=0.0, max_new_tokens=16, concurrency=2, progress=False)
    summary = run_teacher_cache(cfg)
    rows = pl.read_parquet(str(tmp_path / "out" / "*.parquet")).to_dicts()
    assert summary["rows"] == len(rows) == 4
    model = load_model("pkg:smollm2-135m-instruct")
    eot = end_of_turn_ids(tokenizer)[0]
    aligned, shifted, agree, total = [], [], 0, 0
    for row in rows:
        ids = row["teacher_completion_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=False) == row["completion_text"]
        assert eot not in ids        # llama.cpp does not report the stop token: it is left out (and counted)
        prompt = row["teacher_prompt_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0].float()
        reference = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(ids)], dim=-1)   # (m, V)
        token_lp = np.asarray(row["teacher_token_logprobs"], dtype=np.float32)
        aligned.append(np.abs(token_lp - reference.gather(-1, torch.tensor(ids)[:, None])[:, 0].numpy()))
        # the same numbers read one position late (the echo=true pitfall) must be far worse
        late = torch.log_softmax(logits[len(prompt) : len(prompt) + len(ids)], dim=-1)
        shifted.append(np.abs(token_lp - late.gather(-1, torch.tensor(ids)[:, None])[:, 0].numpy()))
        topk_ids = np.asarray(row["teacher_topk_ids"], dtype=np.int64)
        topk_lp = np.asarray(row["teacher_topk_logprobs"], dtype=np.float32)
        named = topk_ids >= 0
        ref_k = reference.gather(-1, torch.tensor(np.where(named, topk_ids, 0))).numpy()
        aligned.append(np.abs(topk_lp - ref_k)[named])
        agree += int((topk_ids[:, 0] == reference.argmax(-1).numpy()).sum())
        total += len(ids)
        # greedy decoding: each token is the server's own most likely named alternative
        assert all(topk_ids[i, 0] == ids[i] or topk_lp[i, 0] - token_lp[i] < 1e-2 for i in range(len(ids)))
    errors, late_errors = np.concatenate(aligned), np.concatenate(shifted)
    assert errors.mean() < LLAMA_CPP_MEAN_TOL and errors.max() < LLAMA_CPP_MAX_TOL, (errors.mean(), errors.max())
    assert late_errors.mean() > 5 * errors.mean()
    assert agree / total > 0.7
    assert math.isfinite(summary["new_tokens_per_s"])


def test_server_going_away_mid_run_stops_resumably(stub, tmp_path, tokenizer):
    from gold_pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    good = (200, llama_cpp_style(tokenizer, "Four.", "stop", k=3))
    cfg = dict(dataset=str(dataset), out=tmp_path / "out", teacher="m", teacher_tokenizer=TOKENIZER,
               backend="openai", base_url=f"http://127.0.0.1:{stub.server_port}/v1", top_k=3, rows_per_shard=1,
               concurrency=1, max_retries=1, progress=False)
    _Stub.script = [good, (503, {"error": "gone"})]
    with pytest.raises(BackendUnavailable, match="--resume to continue from shard 1"):
        run_teacher_cache(TeacherCacheConfig(**cfg))
    assert (tmp_path / "out" / "part-00000.parquet").exists() and not (tmp_path / "out" / "manifest.json").exists()
    _Stub.script = [good]
    summary = run_teacher_cache(TeacherCacheConfig(resume=True, **cfg))
    assert summary["rows"] == 3 and summary["stats"]["openai_stop_token_unscored"] == 3
    rows = pl.read_parquet(str(tmp_path / "out" / "*.parquet")).to_dicts()
    assert all(r["completion_text"] == "Four." for r in rows)


def test_parse_non_canonical_sampled_tokenization(tokenizer, table):
    """A sampled token sequence that re-tokenizing the text would not give ("Hel" + "lo") maps by exact strings."""
    pieces = ["Hel", "lo", " world"]
    ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(p))[0] for p in pieces]
    assert [tokenizer.decode([i]) for i in ids] == pieces and encode_completion(tokenizer, "Hello world") != ids
    response = {"choices": [{"text": "Hello world", "finish_reason": "length", "logprobs": {
        "tokens": pieces, "token_logprobs": [-1.0] * 3, "top_logprobs": [{p: -1.0} for p in pieces]}}]}
    result = parse_completion_response(response, k=1, tokenizer=tokenizer, table=table, stop_ids=[2],
                                       sample_id="s0")
    assert result.completion_ids == ids
