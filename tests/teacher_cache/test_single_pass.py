"""The hf teacher cache records its log-probs during generation (one forward pass per token): they must equal the
former generate-then-score path (a second, teacher-forced pass) on a tiny random Llama with the real SmolLM2
tokenizer, for greedy and seeded sampling, left-padded batches of different prompt lengths, two generations per
prompt and rows that stop early."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gold_pipeline.models.generation import (
    SamplingSettings,
    generate_seeded,
    generate_seeded_with_logprobs,
    sample_seed,
)
from gold_pipeline.teacher_cache.base import TeacherRequest
from gold_pipeline.teacher_cache.hf import HFBackend
from gold_pipeline.text.encode import end_of_turn_ids, render_prompt_ids
from tests.helpers import TEACHER_TOKENIZER, tiny_model, tokenizer

QUESTIONS = ["Hi", "What is 2+2?", "Name three rivers of Europe and say which is longest.", "Count to five, slowly."]
K = 8


@pytest.fixture(scope="module")
def stopping_model():
    """Tiny random Llama whose end-of-turn logit moves by -4 .. +12 nats with a smooth function of the final hidden
    state, so rows of one batch stop at different steps or run to the limit (greedy and sampled alike)."""
    model = tiny_model(TEACHER_TOKENIZER, seed=0)
    eot = end_of_turn_ids(tokenizer(TEACHER_TOKENIZER))[0]

    def raise_eot(module, inputs, output):
        hidden = inputs[0]                                                                     # (B, T, H)
        output = output.clone()                                                                # (B, T, V)
        output[..., eot] += 16 * torch.sigmoid(4 * (hidden[..., 3] - 1)) - 4
        return output

    model.lm_head.register_forward_hook(raise_eot)
    return model


def requests(num_generations: int) -> list[TeacherRequest]:
    """Prompts of different lengths (left padding in one batch), num_generations samples each."""
    tok = tokenizer(TEACHER_TOKENIZER)
    out = []
    for q, question in enumerate(QUESTIONS):
        prompt_ids = render_prompt_ids(tok, [{"role": "user", "content": question}])
        for g in range(num_generations):
            sid = f"q{q}-g{g}"
            out.append(TeacherRequest(sample_id=sid, prompt_ids=prompt_ids, seed=sample_seed(0, sid)))
    return out


def backend(model, single_pass: bool, **sampling) -> HFBackend:
    tok = tokenizer(TEACHER_TOKENIZER)
    stop_ids = [end_of_turn_ids(tok)[0], tok.eos_token_id]
    return HFBackend(model, top_k=K, stop_ids=stop_ids, pad_id=tok.pad_token_id, max_new_tokens=10, batch_size=8,
                     device="cpu", single_pass=single_pass, **sampling)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.7, top_p=0.9)],
                         ids=["greedy", "t0.7-top_p0.9"])
def test_single_pass_logprobs_equal_the_scoring_pass(stopping_model, sampling):
    batch = requests(num_generations=2)
    single = backend(stopping_model, True, **sampling).run(batch)
    two_pass = backend(stopping_model, False, **sampling).run(batch)
    reasons = {r.finish_reason for r in single}
    assert reasons == {"stop", "length"}, "the raised end-of-turn logit should make both finish reasons occur"
    for one, two in zip(single, two_pass):
        assert one.completion_ids == two.completion_ids and one.finish_reason == two.finish_reason
        m = len(one.completion_ids)
        assert one.token_logprobs.shape == (m,) and one.topk_ids.shape == one.topk_logprobs.shape == (m, K)
        assert one.topk_ids.dtype == two.topk_ids.dtype == np.int32
        assert one.token_logprobs.dtype == one.topk_logprobs.dtype == np.float32
        np.testing.assert_allclose(one.token_logprobs, two.token_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(one.topk_logprobs, two.topk_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(one.topk_ids, two.topk_ids)
    if sampling["temperature"] > 0:  # the two generations of a prompt are different samples
        assert any(a.completion_ids != b.completion_ids for a, b in zip(single[::2], single[1::2]))


def test_recording_does_not_change_the_samples(stopping_model):
    """generate_seeded_with_logprobs draws the same ids as generate_seeded (which on-policy rollouts use), also
    in smaller chunks, and keeps the stop id's log-prob but nothing after it."""
    tok = tokenizer(TEACHER_TOKENIZER)
    prompts = [r.prompt_ids for r in requests(1)]
    seeds = list(range(len(prompts)))
    stop_ids = [end_of_turn_ids(tok)[0]]
    sampling = SamplingSettings(max_new_tokens=10, temperature=1.0, batch_size=3)
    ids, finish = generate_seeded(stopping_model, prompts, seeds, sampling, stop_ids=stop_ids,
                                  pad_id=tok.pad_token_id)  # fmt: skip
    ids_lp, finish_lp, logprobs = generate_seeded_with_logprobs(stopping_model, prompts, seeds, sampling,
                                                                stop_ids=stop_ids, pad_id=tok.pad_token_id, top_k=3)
    assert (ids_lp, finish_lp) == (ids, finish)
    for completion, reason, lp in zip(ids, finish, logprobs):
        assert lp.token_logprobs.shape == (len(completion),) and lp.topk_ids.shape == (len(completion), 3)
        assert torch.all(lp.token_logprobs <= lp.topk_logprobs[:, 0] + 1e-6)
        if reason == "stop":
            assert completion[-1] in stop_ids and torch.isfinite(lp.token_logprobs[-1])


def test_recorded_logprobs_stay_raw_under_a_generation_config_penalty():
    """generate runs the processors of the model's own generation_config (here a repetition penalty) before the
    ones gold passes in: the recorded values must still be the raw distribution, as the scoring pass stores."""
    model = tiny_model(TEACHER_TOKENIZER, seed=1)
    model.lm_head.register_forward_hook(lambda module, inputs, output: output * 30)  # logits of a few nats
    model.generation_config.repetition_penalty = 3.0
    batch = requests(num_generations=1)
    single = backend(model, True, temperature=0.0).run(batch)
    two_pass = backend(model, False, temperature=0.0).run(batch)
    for one, two in zip(single, two_pass):
        assert one.completion_ids == two.completion_ids
        np.testing.assert_allclose(one.token_logprobs, two.token_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(one.topk_logprobs, two.topk_logprobs, atol=1e-4, rtol=0)
