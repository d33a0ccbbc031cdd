"""Rollouts sample through models.generation like the teacher cache: every sample has its own seed."""

from __future__ import annotations

import torch

from gold_pipeline.models.generation import SamplingSettings
from gold_pipeline.training.rollouts import HFGenerateBackend, rollout_seeds
from tests.helpers import STUDENT_TOKENIZER, tiny_model, tokenizer


def test_rollouts_do_not_depend_on_the_global_rng_or_their_batch():
    # regression: on-policy rollouts sampled with `generate(do_sample=True)`, i.e. from the global torch RNG
    model = tiny_model(STUDENT_TOKENIZER, seed=0)
    tok = tokenizer(STUDENT_TOKENIZER)
    prompts = [tok("Hello there")["input_ids"], tok("A longer prompt about rivers")["input_ids"]]
    backend = HFGenerateBackend(SamplingSettings(max_new_tokens=6, temperature=1.0, batch_size=2),
                                stop_ids=[tok.eos_token_id], pad_id=0)
    seeds = rollout_seeds(3, sampler="student", global_step=5, process=0, count=2)
    torch.manual_seed(0)
    first = backend.generate(model, prompts, seeds)
    torch.manual_seed(123)
    again = backend.generate(model, prompts, seeds)
    alone = backend.generate(model, prompts[1:], seeds[1:])
    assert first == again and alone == first[1:]
    other = backend.generate(model, prompts, rollout_seeds(3, sampler="student", global_step=6, process=0, count=2))
    assert other != first  # another step draws other samples
    assert seeds != rollout_seeds(3, sampler="student", global_step=5, process=1, count=2)
