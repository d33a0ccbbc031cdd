"""The served teacher (training/teacher_service.py).

Fast tier: a fake OpenAI-compatible server on 127.0.0.1 (http.server in a thread) that answers echo requests from a
known distribution (`fake_logprobs`), shaped like vLLM (aligned, "token_id:N" keys) or like llama-cpp-python
(string keys, text prompts only, shifted by one), plus servers with the wrong tokenizer, one that times out and an
unreachable port. Slow tier: the real llama.cpp server with the SmolLM2 GGUF against a transformers forward pass,
and a 2-step on-policy GOLDTrainer run with it as the teacher."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
import torch

from gold_pipeline.errors import BackendUnavailable, GoldInputError
from gold_pipeline.teacher_cache.openai import build_piece_table
from gold_pipeline.text.encode import encode_completion, end_of_turn_ids, render_prompt_ids
from gold_pipeline.training.teacher_service import TeacherService, reference_logprobs, score_batch
from tests.helpers import (
    CONVERSATIONS,
    STUDENT_TOKENIZER,
    TEACHER_TOKENIZER,
    free_loopback_port,
    gold_args,
    loopback_server,
    tiny_model,
    tokenizer,
)

TOK = tokenizer(TEACHER_TOKENIZER)        # SmolLM2 byte-level BPE 49k
V = len(TOK)
PIECES = build_piece_table(TOK).pieces


def fake_logprobs(ids: list[int], oracle: bool = True) -> np.ndarray:
    """(T, V) log-probs; row t is the distribution of token t + 1 (a bigram bump, plus the true next token with
    `oracle`, so the probe's completion is "predicted")."""
    ids = np.asarray(ids, dtype=np.int64)
    logits = np.zeros((len(ids), V), dtype=np.float64)
    rows = np.arange(len(ids))
    logits[rows, (ids * 31 + 7) % V] += 3.0
    logits[rows, (ids * 17 + 3) % V] += 2.0
    if oracle:
        logits[rows[:-1], ids[1:]] += 5.0
    logits -= logits.max(1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(1, keepdims=True))


class FakeTeacher(torch.nn.Module):
    """A local "teacher" whose forward gives fake_logprobs (the probe's reference)."""

    def __init__(self, noise: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.noise = noise

    def forward(self, input_ids):
        out = torch.from_numpy(fake_logprobs(input_ids[0].tolist())).float()[None]
        if self.noise:
            out = out + self.noise * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))

        class Out:
            logits = out
        return Out()


class Handler(BaseHTTPRequestHandler):
    cfg: dict = {}
    seen: list = []

    def _send(self, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):   # the client gave up (the timeout test)
            pass

    def do_GET(self):  # noqa: N802
        if self.path.endswith("/models"):
            entry = {"id": "teacher"}
            if self.cfg.get("fingerprint"):
                entry["tokenizer_fingerprint"] = self.cfg["fingerprint"]
            return self._send(200, {"object": "list", "data": [entry]})
        self._send(404, {"error": "not found"})

    def do_POST(self):  # noqa: N802
        cfg = self.cfg
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body))
        if self.path.endswith("/tokenize"):
            if cfg.get("tokenize") is None or ("extras" in self.path) != (cfg["tokenize"] == "llama"):
                return self._send(404, {"error": "not found"})
            text = body.get("prompt", body.get("input"))
            ids = TOK.encode(text, add_special_tokens=False)
            if cfg.get("tokenize_wrong"):
                ids = ids[:3] + [ids[3] + 1] + ids[4:]
            return self._send(200, {"tokens": ([0] if cfg["tokenize"] == "llama" else []) + ids})
        calls = sum(1 for p, _ in type(self).seen if p.endswith("/completions"))
        if cfg.get("delay") and calls > cfg.get("delay_after", 0):
            time.sleep(cfg["delay"])
        if cfg.get("text_only") and not isinstance(body["prompt"], str):
            return self._send(500, {"error": {"message": "validation error: prompt should be a valid string"}})
        ids = body["prompt"] if isinstance(body["prompt"], list) else TOK.encode(body["prompt"], add_special_tokens=False)
        self._send(200, echo_answer(ids, body["logprobs"], cfg))

    def log_message(self, *args):
        pass


def echo_answer(ids: list[int], n: int, cfg: dict) -> dict:
    """An echo=true, max_tokens=1 answer for `ids` from fake_logprobs, in the style cfg["style"]."""
    generated = int(np.argmax(fake_logprobs(ids, cfg.get("oracle", True))[-1]))
    seq = list(ids) + [generated]
    lp = fake_logprobs(seq, cfg.get("oracle", True))             # row t: distribution of token t + 1
    llama = cfg["style"] == "llama"
    shift = cfg.get("shift", 0)

    def key(i: int) -> str:
        if cfg.get("wrong_pieces") and i not in (1, 2):
            return PIECES[(i + 1) % V]
        return PIECES[i] if llama else f"token_id:{i}"

    tokens, token_lps, maps = [], [], []
    for j, token in enumerate(seq):
        row = lp[j - 1 + shift] if 0 <= j - 1 + shift < len(seq) else None  # shift 1: the NEXT token's distribution
        tokens.append(key(token))
        if j == 0 or row is None:
            token_lps.append(None)
            maps.append(None)
            continue
        top = np.argsort(-row)[:n]
        entry = {key(int(i)): float(row[i]) for i in top}
        entry[key(token)] = float(row[token])                   # both servers add the actual token
        token_lps.append(float(row[token]))
        maps.append(entry)
    usage = {"prompt_tokens": len(ids), "completion_tokens": 1}
    return {"choices": [{"text": "", "finish_reason": "length", "logprobs": {
        "tokens": tokens, "token_logprobs": token_lps, "top_logprobs": maps}}], "usage": usage}


@pytest.fixture()
def fake_server():
    Handler.seen = []
    with loopback_server(Handler) as server:
        def start(**cfg):
            Handler.cfg = {"style": "vllm", **cfg}
            Handler.seen = []
            return f"http://127.0.0.1:{server.server_port}/v1"

        yield start


def service(url: str, **kwargs) -> TeacherService:
    kwargs.setdefault("top_k", 4)
    return TeacherService(base_url=url, model=None, tokenizer=TOK, timeout_s=5.0, max_retries=2, backoff_s=0.01,
                          **kwargs)


def completion_case():
    prompt = render_prompt_ids(TOK, [{"role": "user", "content": "Name a fruit."}])
    completion = encode_completion(TOK, "An apple, or a pear.") + end_of_turn_ids(TOK)
    return prompt, completion


def expected(prompt, completion, k, oracle=True):
    """Top-k ids/log-probs and actual-token log-probs of the completion under fake_logprobs."""
    lp = fake_logprobs(prompt + completion + [0], oracle)[len(prompt) - 1: len(prompt) - 1 + len(completion)]
    top = np.argsort(-lp, axis=1)[:, :k]
    return top, np.take_along_axis(lp, top, 1), lp[np.arange(len(completion)), completion]


# ------------------------------------------------------------------------------------------------------------
# fast tier
# ------------------------------------------------------------------------------------------------------------


def test_vllm_style_server_is_aligned_and_scores_exactly(fake_server):
    url = fake_server(style="vllm", tokenize="vllm")
    svc = service(url)
    report = svc.probe(FakeTeacher())
    assert report.alignment == "aligned" and svc.shift == 0 and svc.model == "teacher"
    # the reference is a float32 log-softmax over 49k ids: 1e-5 to 2e-5 nats off, by CPU (vector kernels differ)
    assert report.errors["aligned"] < 1e-4 and report.errors["shifted"] > 1.0
    assert any("re-tokenizes the probe text" in c for c in report.checks)
    prompt, completion = completion_case()
    scores = svc.score(prompt, completion)
    top, top_lp, token_lp = expected(prompt, completion, 4)
    assert scores.topk_ids.shape == (len(completion), 4) and scores.num_bounded == 0
    np.testing.assert_array_equal(scores.topk_ids, top)
    np.testing.assert_allclose(scores.topk_logprobs, top_lp, atol=1e-5)
    np.testing.assert_allclose(scores.token_logprobs, token_lp, atol=1e-5)
    body = Handler.seen[-1][1]
    assert body["echo"] is True and body["max_tokens"] == 1 and body["prompt"] == prompt + completion
    assert body["logprobs"] == 8                                  # K + 4 (named alternatives may be dropped)


def test_llama_cpp_style_shifted_by_one_is_detected_and_corrected(fake_server):
    url = fake_server(style="llama", shift=1, text_only=True, tokenize="llama")
    svc = service(url)
    report = svc.probe(FakeTeacher())
    assert report.alignment == "shifted" and svc.shift == 1 and svc.prompt_as == "text"
    assert report.errors["shifted"] < 1e-4 and report.errors["aligned"] > 1.0
    prompt, completion = completion_case()
    scores = svc.score(prompt, completion)
    top, top_lp, token_lp = expected(prompt, completion, 4)
    np.testing.assert_array_equal(scores.topk_ids, top)
    np.testing.assert_allclose(scores.topk_logprobs, top_lp, atol=1e-5)
    np.testing.assert_allclose(scores.token_logprobs, token_lp, atol=1e-5)
    assert isinstance(Handler.seen[-1][1]["prompt"], str)         # llama.cpp takes text prompts only


def test_shift_detected_without_a_local_teacher_by_probe_predictions(fake_server):
    svc = service(fake_server(style="llama", shift=1))
    report = svc.probe(None)
    assert report.alignment == "shifted" and report.hits["shifted"] > 0.9 and report.hits["aligned"] < 0.1
    svc = service(fake_server(style="vllm"))
    assert svc.probe(None, mode="tokens").alignment == "aligned"


def test_shifted_token_logprob_outside_top_is_an_upper_bound(fake_server):
    url = fake_server(style="llama", shift=1, oracle=False)
    svc = service(url, alignment="shifted")
    svc.probe(None, mode="off")
    prompt, completion = completion_case()
    scores = svc.score(prompt, completion)
    top, top_lp, token_lp = expected(prompt, completion, 4, oracle=False)
    np.testing.assert_array_equal(scores.topk_ids, top)
    # the actual tokens are not among the 8 reported alternatives: their log-prob is not sent
    assert scores.num_bounded == len(completion)
    assert (scores.token_logprobs >= token_lp - 1e-6).all()                      # an upper bound ...
    lp = fake_logprobs(prompt + completion + [0], False)[len(prompt) - 1: len(prompt) - 1 + len(completion)]
    eighth = -np.sort(-lp, axis=1)[:, 7]
    np.testing.assert_allclose(scores.token_logprobs, eighth, atol=1e-5)          # ... the 8th reported value


def test_server_matching_neither_reading_is_refused(fake_server):
    svc = service(fake_server(style="vllm"))
    with pytest.raises(GoldInputError, match="match neither reading.*refused"):
        svc.probe(FakeTeacher(noise=2.0))


def test_wrong_tokenizer_is_refused_with_the_difference(fake_server):
    with pytest.raises(GoldInputError, match=r"tokenizes the probe text .* first difference at token 3"):
        service(fake_server(style="llama", tokenize="llama", tokenize_wrong=True)).probe(None)
    with pytest.raises(GoldInputError, match=r"scored other tokens .*completion token 0: the server has"):
        service(fake_server(style="llama", wrong_pieces=True)).probe(None)      # no tokenize endpoint: echo check
    with pytest.raises(GoldInputError, match="declares tokenizer fingerprint"):
        service(fake_server(style="vllm", fingerprint="0" * 64)).probe(None)


def test_declared_matching_fingerprint_passes(fake_server):
    from gold_pipeline.text.tokenizers import tokenizer_fingerprint

    report = service(fake_server(style="vllm", fingerprint=tokenizer_fingerprint(TOK))).probe(None)
    assert "declared tokenizer fingerprint matches" in report.checks


def test_unreachable_server_fails_fast_naming_the_address():
    port = free_loopback_port()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=rf"127\.0\.0\.1:{port}/v1 cannot be reached after 2 retries"):
        service(f"http://127.0.0.1:{port}/v1").probe(None)
    assert time.monotonic() - started < 5.0


def test_server_timing_out_mid_run_stops_resumably(fake_server):
    url = fake_server(style="vllm", delay=5.0, delay_after=2)      # the 2 probe requests pass, later ones hang
    svc = TeacherService(base_url=url, model=None, tokenizer=TOK, top_k=4, timeout_s=1.5, max_retries=2,
                         backoff_s=0.01)
    svc.probe(None)
    prompt, completion = completion_case()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"did not answer .* after 2 retries.*--resume-from-checkpoint latest"):
        svc.score(prompt, completion)
    assert time.monotonic() - started < 3 * 1.5 + 2.0               # 3 tries of 1.5 s + backoff
    assert sum(1 for p, _ in Handler.seen if p.endswith("/completions")) == 2 + 3      # probe + 1 try + 2 retries


def test_config_validation():
    from gold_pipeline.training import GOLDConfig

    def cfg(**kw):
        return GOLDConfig(output_dir="/tmp/x", use_cpu=True, report_to="none", **kw)

    with pytest.raises(GoldInputError, match="teacher_server_url='127.0.0.1:8000'.*http://"):
        cfg(teacher_server_url="127.0.0.1:8000")
    with pytest.raises(GoldInputError, match="seq_kd"):
        cfg(teacher_server_url="http://127.0.0.1:1/v1", seq_kd=True)
    with pytest.raises(GoldInputError, match="teacher_server_probe.*'off'"):
        cfg(teacher_server_url="http://127.0.0.1:1/v1", teacher_server_probe="off")
    with pytest.raises(GoldInputError, match="teacher_server_retries"):
        cfg(teacher_server_url="http://127.0.0.1:1/v1", teacher_server_retries=-1)
    assert cfg(teacher_server_url="http://127.0.0.1:1/v1").teacher_server_top_k == 16


def test_trainer_scores_on_policy_rollouts_with_the_served_teacher(fake_server, tmp_path):
    from gold_pipeline.training import GOLDTrainer
    from gold_pipeline.training.collate import collate_rows

    # shifted by one and text prompts only, like llama.cpp; "token_id:N" keys so that every alternative is named
    url = fake_server(style="vllm", shift=1, text_only=True)
    trainer = GOLDTrainer(model=tiny_model(STUDENT_TOKENIZER, 0), teacher_model=FakeTeacher(),
                          args=gold_args(tmp_path, lmbda=1.0, max_steps=2, teacher_server_url=url,
                                         teacher_server_top_k=4),
                          train_dataset=CONVERSATIONS, processing_class=tokenizer(STUDENT_TOKENIZER),
                          teacher_processing_class=TOK)
    assert trainer.teacher_model is None and trainer.teacher_service.shift == 1    # the reference is dropped
    # the served scores are laid out like cached top-K: (Nt, K) over the batch's teacher completion tokens
    rows = [trainer.train_dataset[i] for i in (0, 1)]
    batch = collate_rows(rows, trainer.pair)
    outputs, bounded = score_batch(trainer.teacher_service, batch)
    assert outputs["topk_ids"].shape == (batch["teacher_token_ids"].shape[0], 4) and bounded == 0
    start = 0
    for row in rows:
        m = len(row["teacher_completion_ids"])
        top, _, token_lp = expected(list(row["teacher_prompt_ids"]), list(row["teacher_completion_ids"]), 4)
        np.testing.assert_array_equal(outputs["topk_ids"][start:start + m].numpy(), top)
        np.testing.assert_allclose(outputs["token_logprobs"][start:start + m].numpy(), token_lp, atol=1e-5)
        start += m
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["on_policy_share"] == 1.0 for h in logs)
    assert all(np.isfinite(h["loss"]) for h in logs)
    scored = [b for p, b in Handler.seen if p.endswith("/completions")]
    assert len(scored) >= 2 + 2 * 4                 # 2 probes (+ the ids->text fallback) + 2 steps x 4 rollouts


def test_gold_train_with_the_served_teacher_and_its_failures(fake_server, tmp_path):
    from typer.testing import CliRunner

    from gold_pipeline.cli.main import app

    student = tmp_path / "student"
    tiny_model(STUDENT_TOKENIZER, 0).save_pretrained(str(student))
    tokenizer(STUDENT_TOKENIZER).save_pretrained(str(student))
    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS[:4]))

    def gold_train(url: str, out: str, *extra: str):
        return CliRunner().invoke(app, [
            "train", "--student", str(student), "--teacher-tokenizer", TEACHER_TOKENIZER, "--dataset", str(data),
            "--output-dir", str(tmp_path / out), "--teacher-server-url", url, "--teacher-server-top-k", "4",
            "--teacher-server-retries", "1", "--lmbda", "1", "--max-steps", "1", "--max-completion-length", "8",
            "--per-device-train-batch-size", "2", "--report-to", "none", "--use-cpu", "--set", "save_strategy='no'",
            *extra])

    result = gold_train(fake_server(style="vllm"), "ok")
    assert result.exit_code == 0, result.output
    assert "trained 1 steps" in result.output
    result = gold_train(fake_server(style="vllm", delay=5.0, delay_after=2), "hang", "--teacher-server-timeout", "2")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "did not answer" in result.output and "--resume-from-checkpoint latest" in result.output
    port = free_loopback_port()
    result = gold_train(f"http://127.0.0.1:{port}/v1", "closed")
    assert result.exit_code == 1 and f"127.0.0.1:{port}/v1 cannot be reached" in result.output, result.output


# ------------------------------------------------------------------------------------------------------------
# slow tier: the real llama.cpp server (llama-cpp-python, SmolLM2 GGUF)
# ------------------------------------------------------------------------------------------------------------

from tests.teacher_cache.test_openai import (  # noqa: E402  (the shared real-server fixture and tolerances)
    LLAMA_CPP_MAX_TOL,
    LLAMA_CPP_MEAN_TOL,
    llama_server,  # noqa: F401
)


@pytest.fixture(scope="module")
def smollm2():
    from gold_pipeline.models.loading import load_model

    return load_model("pkg:smollm2-135m-instruct")


@pytest.mark.slow
def test_llama_cpp_served_teacher_matches_transformers(llama_server, smollm2):  # noqa: F811
    svc = TeacherService(base_url=llama_server, model=None, tokenizer=TOK, top_k=8, timeout_s=120.0)
    report = svc.probe(smollm2)
    # llama-cpp-python 0.3.36 lines up prompts that start with its BOS (<|im_start|>, as every chat prompt here)
    # and shifts the others by one: the probe finds both, and the shifted ones are corrected
    assert report.alignment == "aligned" and report.errors["aligned"] < LLAMA_CPP_MEAN_TOL, report
    assert report.plain_errors["shifted"] < LLAMA_CPP_MEAN_TOL < report.plain_errors["aligned"], report
    assert svc.shift == 1 and svc.shift_by_first == {TOK.convert_tokens_to_ids("<|im_start|>"): 0}
    errors, agree, total, bounded = [], 0, 0, 0
    for question, answer in [("What is the capital of France?", "The capital of France is Paris."),
                             ("Name three fruits.", "Apple, banana and cherry."),
                             ("Say 'ok'.", "ok"),
                             (None, " Paris is the capital of France.")]:
        if question is None:   # a plain prompt (no chat template): the shifted, corrected reading
            prompt, completion = encode_completion(TOK, "The capital of France is Paris."), encode_completion(TOK, answer)
        else:
            prompt = render_prompt_ids(TOK, [{"role": "user", "content": question}])
            completion = encode_completion(TOK, answer) + end_of_turn_ids(TOK)
        scores = svc.score(prompt, completion)
        reference = reference_logprobs(smollm2, prompt, completion)                 # (m, V)
        named = scores.topk_ids >= 0
        ref_k = reference.gather(1, torch.from_numpy(np.where(named, scores.topk_ids, 0))).numpy()
        errors.append(np.abs(scores.topk_logprobs - ref_k)[named])
        reported = ~scores.bounded
        ref_token = reference.gather(1, torch.tensor(completion)[:, None])[:, 0].numpy()
        errors.append(np.abs(scores.token_logprobs - ref_token)[reported])
        assert (scores.token_logprobs[~reported] >= ref_token[~reported] - LLAMA_CPP_MAX_TOL).all()
        agree += int((scores.topk_ids[:, 0] == reference.argmax(-1).numpy()).sum())
        total += len(completion)
        bounded += scores.num_bounded
    errors = np.concatenate(errors)
    assert errors.mean() < LLAMA_CPP_MEAN_TOL and errors.max() < LLAMA_CPP_MAX_TOL, (errors.mean(), errors.max())
    assert agree / total > 0.7, agree / total
    print(f"plain_errors={report.plain_errors} alignment={report.alignment} mean|Δ|={errors.mean():.3f} max={errors.max():.3f} top1 agree="
          f"{agree / total:.2f} bounded={bounded}/{total} checks={report.checks}")


@pytest.mark.slow
def test_two_step_on_policy_run_with_the_llama_cpp_teacher(llama_server, tmp_path):  # noqa: F811
    from gold_pipeline.training import GOLDTrainer

    trainer = GOLDTrainer(model=tiny_model(STUDENT_TOKENIZER, 0), args=gold_args(
        tmp_path, lmbda=1.0, max_steps=2, max_completion_length=8, teacher_server_url=llama_server,
        teacher_server_top_k=8, teacher_server_probe="tokens", teacher_server_timeout=120.0),
        train_dataset=CONVERSATIONS[:4], processing_class=tokenizer(STUDENT_TOKENIZER),
        teacher_processing_class=TOK)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(np.isfinite(h["loss"]) and h["on_policy_share"] == 1.0 for h in logs)
