"""Shared test helpers (conftest.py also exposes them as fixtures): real packaged tokenizers loaded once per
pytest process (from the on-disk cache after the first build) and reused read-only, tiny models built from a
config, a few conversations, and a GOLDConfig for fast CPU runs."""

from __future__ import annotations

import contextlib
import socket
import threading
from functools import lru_cache
from http.server import ThreadingHTTPServer
from pathlib import Path

import torch

from gold_pipeline.text.bytes import byte_table
from gold_pipeline.text.tokenizers import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "gold_pipeline" / "recipes" / "demo_data"  # the packaged demo data (shipped in the wheel)


@lru_cache(maxsize=None)
def tok(name: str):
    """A shared tokenizer: do not change its chat template (load a fresh one for that)."""
    return load_tokenizer(name)


def table(name: str):
    return byte_table(tok(name))


STUDENT_TOKENIZER = "pkg:mistral-sp-v1"  # SentencePiece 32k
TEACHER_TOKENIZER = "pkg:smollm2"  # byte-level BPE 49k (cheaper than DeepSeek's 129k for most tests)
DEEPSEEK_TOKENIZER = "pkg:deepseek-v3"  # byte-level BPE 129k
TINY = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)

WORDS = ["apple", "river", "mountain", "zebra", "violin", "lantern", "glacier", "pepper"]
CONVERSATIONS = [
    {
        "messages": [
            {"role": "user", "content": f"Tell me about the word {w}."},
            {"role": "assistant", "content": f"The word {w} has {len(w)} letters; naïve café — {w.upper()}!"},
        ]
    }
    for w in WORDS
]


def tokenizer(name: str):
    """The shared tokenizer of `name` (the same object as tok(name))."""
    return tok(name)


def tiny_model(name: str, seed: int):
    from gold_pipeline.models.loading import tiny_model_for

    return tiny_model_for(tokenizer(name), seed=seed, **TINY)


def gold_args(output_dir, **overrides):
    from gold_pipeline.training import GOLDConfig

    fields = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        max_completion_length=16,
        max_length=128,
        use_uld_loss=True,
        uld_use_hybrid_loss=True,
        lmbda=0.0,
        seed=0,
    )
    fields.update(overrides)
    return GOLDConfig(**fields)


def make_trainer(tmp_path, *, student=STUDENT_TOKENIZER, teacher=TEACHER_TOKENIZER, data=None, **overrides):
    from gold_pipeline.training import GOLDTrainer

    return GOLDTrainer(
        model=tiny_model(student, 0),
        teacher_model=tiny_model(teacher, 1),
        args=gold_args(tmp_path, **overrides),
        train_dataset=CONVERSATIONS if data is None else data,
        processing_class=tokenizer(student),
        teacher_processing_class=tokenizer(teacher),
    )


def fixed_batch_loss(trainer, indices=(0, 1, 2, 3)) -> float:
    """The distillation loss (window = this batch) of fixed dataset rows, without gradients."""
    from gold_pipeline.training.collate import collate_rows

    rows = [trainer.train_dataset[i] for i in indices]
    batch = collate_rows(rows, trainer.pair)
    batch["policy"] = "off"
    batch = trainer._prepare_inputs(batch)
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def train_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def free_loopback_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound once and closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def loopback_server(handler):
    """An http.server on 127.0.0.1 (a free port) serving `handler` in a daemon thread; yields the server and shuts
    it down on exit (the fake OpenAI-compatible servers of the teacher-cache and teacher-service tests)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
