"""Completion-only logits and group-chunked losses: same numbers as the full computation."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gold_pipeline.losses import (
    MergeSide,
    chunked_merged_loss,
    completion_logits,
    generalized_jsd_loss,
    hybrid_loss,
    merged_logprobs_from_logits,
    uld_loss,
    vocab_split,
)


def _tiny_llama(vocab=37, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).double().eval()


def test_completion_logits_equal_the_full_forward_sliced():
    model = _tiny_llama()
    input_ids = torch.randint(0, 37, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 7:] = 0  # right padding
    completion_mask = torch.zeros(2, 9, dtype=torch.bool)
    completion_mask[0, 4:] = True
    completion_mask[1, 2:7] = True
    ours = completion_logits(model, input_ids, attention_mask, completion_mask)  # (N, V)
    full = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    rows, cols = completion_mask.nonzero(as_tuple=True)
    torch.testing.assert_close(ours, full[rows, cols - 1])
    assert ours.shape == (int(completion_mask.sum()), 37)


def test_completion_at_position_zero_is_refused():
    model = _tiny_llama()
    mask = torch.zeros(1, 4, dtype=torch.bool)
    mask[0, 0:] = True
    with pytest.raises(ValueError, match="position 0"):
        completion_logits(model, torch.zeros(1, 4, dtype=torch.long), None, mask)


def _sides(seed=0, groups=23, vs=37, vt=41, hidden=16):
    gen = torch.Generator().manual_seed(seed)
    s_gid = torch.repeat_interleave(torch.arange(groups), torch.randint(1, 3, (groups,), generator=gen))
    t_gid = torch.repeat_interleave(torch.arange(groups), torch.randint(1, 4, (groups,), generator=gen))
    s_gid = torch.cat([s_gid[:5], torch.tensor([-1]), s_gid[5:]])
    s_hidden = torch.randn(len(s_gid), hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    s_head = torch.nn.Linear(hidden, vs, bias=False).double()
    t_logits = torch.randn(len(t_gid), vt, generator=gen, dtype=torch.float64) * 2
    s_tok = torch.randint(0, vs, (len(s_gid),), generator=gen)
    t_tok = torch.randint(0, vt, (len(t_gid),), generator=gen)
    return s_hidden, s_head, s_tok, s_gid, t_logits, t_tok, t_gid, groups


@pytest.mark.parametrize("loss_name", ["hybrid", "uld"])
@pytest.mark.parametrize("strategy", ["first", "last"])
def test_chunked_equals_unchunked(loss_name, strategy):
    s_hidden, s_head, s_tok, s_gid, t_logits, t_tok, t_gid, g = _sides()
    split = vocab_split(torch.tensor([[0, 1], [5, 5], [7, 30], [36, 40]]), 37, 41)
    fn = functools.partial(hybrid_loss, vocab_map=split, beta=0.5) if loss_name == "hybrid" else uld_loss
    s_m = merged_logprobs_from_logits(s_head(s_hidden), s_tok, s_gid, g, strategy, temperature=0.9)
    t_m = merged_logprobs_from_logits(t_logits, t_tok, t_gid, g, strategy, temperature=1.1)
    full, full_diag = fn(s_m, t_m, denominator=50.0)
    full_grads = torch.autograd.grad(full, [s_hidden, s_head.weight])
    student = MergeSide(s_hidden, s_tok, s_gid, head=s_head, temperature=0.9)
    teacher = MergeSide(t_logits, t_tok, t_gid, temperature=1.1)
    # the documented kept-bytes estimate of the first two 5-group chunks: 4 B x Vs x (2 x tokens + 3 x groups)
    two_chunks = 4 * 37 * (2 * int(((s_gid >= 0) & (s_gid < 10)).sum()) + 3 * 10)
    for chunk, ckpt, keep, recomputed in ((1, True, 0, g), (5, True, 0, 5), (7, False, 0, 0), (100, True, 0, 1),
                                          (5, True, 10**9, 0), (5, True, two_chunks, 3)):
        loss, diag = chunked_merged_loss(student, teacher, g, fn, denominator=50.0, strategy=strategy,
                                         groups_per_chunk=chunk, checkpoint_chunks=ckpt, keep_bytes=keep)
        assert diag["recomputed_chunks"] == recomputed  # a budget keeps the first chunks, recomputes the rest
        grads = torch.autograd.grad(loss, [s_hidden, s_head.weight])
        torch.testing.assert_close(loss, full)
        for a, b in zip(grads, full_grads):
            torch.testing.assert_close(a, b)
        assert diag["chunks"] == -(-g // chunk)
        assert diag["student_excluded_tokens"] == 1 and diag["teacher_excluded_tokens"] == 0
        key = "matched" if loss_name == "hybrid" else "uld"
        assert diag[key] == pytest.approx(full_diag[key])


def test_chunked_same_tokenizer_jsd_equals_generalized_jsd():
    gen = torch.Generator().manual_seed(3)
    n, vocab = 17, 11
    s_logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (n,), generator=gen)
    gid = torch.arange(n)
    gid[-1] = -1  # EOS excluded
    expected, _ = generalized_jsd_loss(s_logits, t_logits, beta=0.3, mask=gid >= 0)

    def jsd(s_m, t_m, denominator):
        return generalized_jsd_loss(s_m, t_m, beta=0.3, denominator=denominator, inputs_are_logprobs=True)

    loss, _ = chunked_merged_loss(MergeSide(s_logits, tokens, gid), MergeSide(t_logits, tokens, gid), n - 1, jsd,
                                  groups_per_chunk=4)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("loss_name", ["hybrid", "uld"])
def test_chunked_topk_teacher_equals_unchunked(loss_name):
    # the cached top-K teacher side (TopkSide) merged per chunk; float32 takes the NumPy kernels, also when a
    # checkpointed chunk is recomputed in backward
    from gold_pipeline.losses import hybrid_loss_topk, merged_topk, uld_loss_topk
    from gold_pipeline.losses.topk import TopkSide

    s_hidden, s_head, s_tok, s_gid, t_logits, t_tok, t_gid, g = _sides(seed=4)
    s_hidden = s_hidden.detach().float().requires_grad_()
    s_head = s_head.float()
    t_lp = torch.log_softmax(t_logits.float(), -1)
    top = t_lp.topk(8, dim=-1)
    token_lp = t_lp.gather(1, t_tok.unsqueeze(1)).squeeze(1)
    split = vocab_split(torch.tensor([[0, 1], [5, 5], [7, 30], [36, 40], [12, 3]]), 37, 41)
    fn = (functools.partial(hybrid_loss_topk, vocab_map=split, beta=0.5) if loss_name == "hybrid"
          else functools.partial(uld_loss_topk, teacher_vocab_size=41))
    s_m = merged_logprobs_from_logits(s_head(s_hidden), s_tok, s_gid, g, "first")
    full, full_diag = fn(s_m, merged_topk(top.indices, top.values, token_lp, t_gid, g), denominator=50.0)
    full_grads = torch.autograd.grad(full, [s_hidden, s_head.weight])
    student = MergeSide(s_hidden, s_tok, s_gid, head=s_head)
    teacher = TopkSide(top.indices, top.values, token_lp, t_gid)
    for chunk, ckpt in ((1, True), (5, True), (7, False), (100, True)):
        loss, diag = chunked_merged_loss(student, teacher, g, fn, denominator=50.0, groups_per_chunk=chunk,
                                         checkpoint_chunks=ckpt)
        torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-7)
        for a, b in zip(torch.autograd.grad(loss, [s_hidden, s_head.weight]), full_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        for key in ("matched", "matched_low", "matched_high", "unmatched", "uld", "topk_error_bound"):
            if key in full_diag:
                assert diag[key] == pytest.approx(full_diag[key], rel=1e-4, abs=1e-7)
