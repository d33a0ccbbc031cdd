"""Step time of on-policy GOLD training with the teacher served by llama.cpp vs the same teacher in process.

Same student (a tiny Llama-style model on the Mistral SentencePiece tokenizer, same seed), same data, same run:
the teacher is SmolLM2-135M-Instruct, once loaded with transformers in the training process and once served by
llama-cpp-python (the packaged Q4_1 GGUF, 127.0.0.1) and reached through `teacher_server_url`
(training/teacher_service.py). lmbda = 1: every step samples rollouts with the student and scores them with the
teacher. The first step of each run is a warm-up and not counted. Last line: one JSON object.

    flock /tmp/bench.lock .venv/bin/python bench/teacher_service.py [--steps 3] [--rows 2] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from gold_pipeline.models.loading import PKG_MODELS, tiny_model_for
from gold_pipeline.text.tokenizers import load_tokenizer
from gold_pipeline.training import GOLDConfig, GOLDTrainer

STUDENT_TOKENIZER = "pkg:mistral-sp-v1"
TEACHER = "pkg:smollm2-135m-instruct"
TEACHER_TOKENIZER = "pkg:smollm2"
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
QUESTIONS = ["What is the capital of France?", "Name three fruits.", "Write one sentence about the sea.",
             "What is 12 plus 30?", "Describe a cat in five words.", "Why is the sky blue?",
             "Give me a synonym for happy.", "What do bees make?"]
SERVER_START_S = 180


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(log: Path) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(PKG_MODELS[TEACHER].gguf_path()), "--host",
             "127.0.0.1", "--port", str(port), "--n_ctx", "2048"], stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process, f"http://127.0.0.1:{port}/v1"
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"llama.cpp server did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)


def run(mode: str, opts, out: Path, url: str | None) -> dict:
    student_tok, teacher_tok = load_tokenizer(STUDENT_TOKENIZER), load_tokenizer(TEACHER_TOKENIZER)
    data = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "I do not know."}]}
            for q in QUESTIONS]
    served = dict(teacher_server_url=url, teacher_server_top_k=opts.top_k, teacher_server_probe="tokens",
                  teacher_server_timeout=300.0) if mode == "served" else {}
    args = GOLDConfig(output_dir=str(out / mode), per_device_train_batch_size=opts.rows, gradient_accumulation_steps=1,
                      max_steps=opts.steps + 1, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                      report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                      max_completion_length=opts.max_new_tokens, max_length=256, use_uld_loss=True,
                      uld_use_hybrid_loss=True, lmbda=1.0, seed=0, metrics_jsonl=None, **served)
    timer = StepTimer()
    started = time.perf_counter()
    trainer = GOLDTrainer(model=tiny_model_for(student_tok, seed=0, **TINY),
                          teacher_model=TEACHER if mode == "in_process" else None, args=args, train_dataset=data,
                          processing_class=student_tok, teacher_processing_class=teacher_tok, callbacks=[timer])
    setup_s = time.perf_counter() - started
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h][1:]
    steps = timer.times[1:]
    result = {"setup_s": round(setup_s, 2), "step_s": round(float(np.mean(steps)), 3),
              "step_s_all": [round(t, 3) for t in steps], "loss": [round(h["loss"], 4) for h in logs]}
    scoring = [h.get("counter/teacher_service_seconds") for h in logs]
    if mode == "served" and all(v is not None for v in scoring):
        result["scoring_s_per_step"] = round(float(np.mean(scoring)), 3)
        result["token_logprob_bounded_per_step"] = float(np.mean(
            [h.get("counter/teacher_service_token_logprob_bounded", 0) for h in logs]))
        result["probe"] = trainer.teacher_service and {"shift": trainer.teacher_service.shift,
                                                       "shift_by_first": trainer.teacher_service.shift_by_first}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="Counted steps per run (after one warm-up step).")
    parser.add_argument("--rows", type=int, default=2, help="Rollouts per step.")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=8)
    opts = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        in_process = run("in_process", opts, out, None)
        print("in_process", json.dumps(in_process), flush=True)
        process, url = start_server(out / "server.log")
        try:
            served = run("served", opts, out, url)
        finally:
            process.terminate()
            process.wait(timeout=30)
        print("served", json.dumps(served), flush=True)
    summary = {"bench": "teacher_service", "teacher": TEACHER, "server": "llama-cpp-python 0.3.36",
               "rollouts_per_step": opts.rows, "max_new_tokens": opts.max_new_tokens, "top_k": opts.top_k,
               "counted_steps": opts.steps, "torch_threads": torch.get_num_threads(),
               "in_process_step_s": in_process["step_s"], "served_step_s": served["step_s"],
               "served_over_in_process": round(served["step_s"] / in_process["step_s"], 2),
               "served_scoring_s_per_step": served.get("scoring_s_per_step"), "in_process": in_process,
               "served": served}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
