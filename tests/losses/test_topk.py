"""Top-k teacher forms: K = V equals the exact loss; otherwise the error stays within the tail-mass bound."""

from __future__ import annotations

import pytest
import torch

from gold_pipeline.losses import (
    generalized_jsd_loss,
    generalized_jsd_loss_topk,
    hybrid_loss,
    hybrid_loss_topk,
    merged_logprobs_from_logits,
    merged_topk,
    tail_logprob,
    uld_loss,
    uld_loss_topk,
    vocab_split,
)
from gold_pipeline.losses.topk import TopkMerged, dense_teacher, tail_model

STRATEGIES = ("first", "last")


def _case(seed, vs=30, vt=40, groups=5):
    gen = torch.Generator().manual_seed(seed)
    s_sizes = torch.randint(1, 3, (groups,), generator=gen)
    t_sizes = torch.randint(1, 4, (groups,), generator=gen)
    s_gid = torch.repeat_interleave(torch.arange(groups), s_sizes)
    t_gid = torch.cat([torch.repeat_interleave(torch.arange(groups), t_sizes), torch.tensor([-1])])  # + EOS
    s_logits = (torch.randn(len(s_gid), vs, generator=gen, dtype=torch.float64) * 2.5).requires_grad_()
    t_logits = torch.randn(len(t_gid), vt, generator=gen, dtype=torch.float64) * 2.5
    s_tok = torch.randint(0, vs, (len(s_gid),), generator=gen)
    t_tok = torch.randint(0, vt, (len(t_gid),), generator=gen)
    perm = torch.randperm(vt, generator=gen)[:18]
    pairs = torch.stack([torch.arange(18) + 3, perm], dim=1)
    return s_logits, t_logits, s_tok, t_tok, s_gid, t_gid, pairs, groups


def _teacher_topk(t_logits, t_tok, t_gid, groups, k, strategy):
    lp = torch.log_softmax(t_logits, -1)
    values, ids = lp.topk(k, dim=-1)
    token_lp = lp.gather(1, t_tok.unsqueeze(1)).squeeze(1)  # the cache's actual-token log-prob
    return merged_topk(ids, values, token_lp, t_gid, groups, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 on CPU: the NumPy kernels
def test_topk_with_k_equal_vocab_equals_exact(strategy, dtype):
    s_logits, t_logits, s_tok, t_tok, s_gid, t_gid, pairs, g = _case(1)
    s_logits, t_logits = s_logits.detach().to(dtype).requires_grad_(), t_logits.to(dtype)
    s_m = merged_logprobs_from_logits(s_logits, s_tok, s_gid, g, strategy)
    t_m = merged_logprobs_from_logits(t_logits, t_tok, t_gid, g, strategy)
    teacher = _teacher_topk(t_logits, t_tok, t_gid, g, t_logits.shape[1], strategy)
    split = vocab_split(pairs, s_logits.shape[1], t_logits.shape[1])
    torch.testing.assert_close(uld_loss_topk(s_m, teacher, t_logits.shape[1])[0], uld_loss(s_m, t_m)[0])
    for beta in (0.0, 0.5, 1.0):
        torch.testing.assert_close(hybrid_loss_topk(s_m, teacher, split, beta=beta)[0],
                                   hybrid_loss(s_m, t_m, split, beta=beta)[0])
    # gradients agree too
    a = torch.autograd.grad(hybrid_loss_topk(s_m, teacher, split, beta=0.5)[0], s_logits, retain_graph=True)[0]
    b = torch.autograd.grad(hybrid_loss(s_m, t_m, split, beta=0.5)[0], s_logits)[0]
    torch.testing.assert_close(a, b)


def test_jsd_topk_with_k_equal_vocab_equals_exact():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    t = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    values, ids = torch.log_softmax(t, -1).topk(12, dim=-1)
    mask = torch.tensor([True, True, False, True, True, True, True])
    for beta in (0.0, 0.5, 1.0):
        exact, _ = generalized_jsd_loss(s, t, beta=beta, mask=mask)
        topk, _ = generalized_jsd_loss_topk(s, ids, values, beta=beta, mask=mask)
        torch.testing.assert_close(topk, exact)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("k", [1, 4, 15])
def test_uld_topk_error_bounded_by_twice_the_tail_mass(strategy, k):
    s_logits, t_logits, s_tok, t_tok, s_gid, t_gid, _, g = _case(3 + k)
    s_m = merged_logprobs_from_logits(s_logits, s_tok, s_gid, g, strategy)
    t_m = merged_logprobs_from_logits(t_logits, t_tok, t_gid, g, strategy)
    exact, _ = uld_loss(s_m, t_m)
    approx, diag = uld_loss_topk(s_m, _teacher_topk(t_logits, t_tok, t_gid, g, k, strategy), t_logits.shape[1])
    assert diag["teacher_tail_mass"] > 0
    assert abs(float(approx.detach()) - float(exact.detach())) <= diag["topk_error_bound"] + 1e-12


@pytest.mark.parametrize("k", [1, 3, 8])
def test_jsd_topk_error_is_a_nonnegative_gap_bounded_by_tail_mass(k):
    gen = torch.Generator().manual_seed(k)
    s = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 2
    values, ids = torch.log_softmax(t, -1).topk(k, dim=-1)
    for beta in (0.0, 0.25, 0.5, 0.9, 1.0):
        exact, _ = generalized_jsd_loss(s, t, beta=beta)
        approx, diag = generalized_jsd_loss_topk(s, ids, values, beta=beta)
        gap = float(exact) - float(approx)
        assert gap >= -1e-12  # coarsening never increases a divergence
        if 0 < beta < 1:
            assert gap <= diag["topk_error_bound"] + 1e-12


def test_hybrid_topk_error_shrinks_with_the_tail_mass():
    s_logits, t_logits, s_tok, t_tok, s_gid, t_gid, pairs, g = _case(9, vs=60, vt=80)
    t_logits = t_logits * 2.5  # peaked teacher: most mass in few ids
    s_m = merged_logprobs_from_logits(s_logits, s_tok, s_gid, g)
    t_m = merged_logprobs_from_logits(t_logits, t_tok, t_gid, g)
    split = vocab_split(pairs, 60, 80)
    exact, _ = hybrid_loss(s_m, t_m, split, beta=0.5)
    errors, tails = [], []
    for k in (2, 10, 40, 80):
        approx, diag = hybrid_loss_topk(s_m, _teacher_topk(t_logits, t_tok, t_gid, g, k, "first"), split, beta=0.5)
        errors.append(abs(float(approx.detach()) - float(exact.detach())))
        tails.append(diag["teacher_tail_mass"])
    assert tails == sorted(tails, reverse=True) and errors[-1] < 1e-12
    assert errors[2] < errors[0]


def test_tail_logprob_of_a_full_distribution_is_minus_inf_and_finite_otherwise():
    lp = torch.log_softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    assert torch.isinf(tail_logprob(lp)).all() or (tail_logprob(lp).exp() < 1e-12).all()
    part = tail_logprob(lp[:, :2])
    torch.testing.assert_close(part.exp(), 1 - lp[:, :2].exp().sum(-1))


def test_topk_padding_slots_minus_one_are_ignored():
    # regression: an OpenAI-compatible server can return fewer than K alternatives; the cache pads those slots
    # with id -1 / log-prob -inf. They must act as absent entries, not as the last vocabulary column.
    s_logits, t_logits, s_tok, t_tok, s_gid, t_gid, pairs, g = _case(5)
    split = vocab_split(pairs, s_logits.shape[1], t_logits.shape[1])
    s_m = merged_logprobs_from_logits(s_logits, s_tok, s_gid, g, "first")
    lp = torch.log_softmax(t_logits, -1)
    values, ids = lp.topk(6, dim=-1)
    token_lp = lp.gather(1, t_tok.unsqueeze(1)).squeeze(1)
    padded_ids = torch.cat([ids, torch.full_like(ids[:, :2], -1)], dim=1)  # (N, 8) with two empty slots
    padded_values = torch.cat([values, torch.full_like(values[:, :2], float("-inf"))], dim=1)
    plain = merged_topk(ids, values, token_lp, t_gid, g, "first")
    padded = merged_topk(padded_ids, padded_values, token_lp, t_gid, g, "first")
    for beta in (0.0, 0.5, 1.0):
        expected = hybrid_loss_topk(s_m, plain, split, beta=beta)[0]
        got = hybrid_loss_topk(s_m, padded, split, beta=beta)[0]
        torch.testing.assert_close(got, expected)
        assert torch.isfinite(torch.autograd.grad(got, s_logits, retain_graph=True)[0]).all()
    s = torch.randn(len(t_tok), t_logits.shape[1], dtype=torch.float64, requires_grad=True)
    for beta in (0.0, 0.5, 1.0):
        expected = generalized_jsd_loss_topk(s, ids, values, beta=beta)[0]
        got = generalized_jsd_loss_topk(s, padded_ids, padded_values, beta=beta)[0]
        torch.testing.assert_close(got, expected)
        assert torch.isfinite(torch.autograd.grad(got, s)[0]).all()


# ---------------------------------------------------------------------------------------- power-law tail model --
def _zipf_pair(seed, groups=40, vs=3000, vt=4000, matched=2500, noise=1.0):
    """Zipf-shaped student/teacher log-probs over related vocabularies (teacher = student's ranking + noise)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.stack([torch.randperm(vs, generator=gen)[:matched], torch.randperm(vt, generator=gen)[:matched]], 1)
    s_rank = torch.stack([torch.randperm(vs, generator=gen) for _ in range(groups)]).double() + 1
    s_lp = torch.log_softmax(-1.1 * torch.log(s_rank), -1)  # (G, Vs) Zipf exponent 1.1
    t_score = torch.randn(groups, vt, generator=gen, dtype=torch.float64) * noise
    t_score[:, pairs[:, 1]] += -1.1 * torch.log(s_rank[:, pairs[:, 0]]) * 1.3  # related to the student's ranking
    t_score[:, torch.ones(vt, dtype=torch.bool).index_fill_(0, pairs[:, 1], False)] -= 10.0  # unmatched: rare
    t_lp = torch.log_softmax(t_score, -1)
    return s_lp, t_lp, pairs


def _topk_of(t_lp, k):
    values, ids = t_lp.topk(k, dim=-1)
    g = t_lp.shape[0]
    return merged_topk(ids, values, values[:, 0], torch.arange(g), g)  # one token per group: merge is the identity


def test_tail_model_recovers_a_power_law_tail():
    v, k = 5000, 64
    ranks = torch.arange(1, v + 1, dtype=torch.float64)
    lp = torch.log_softmax(-1.3 * torch.log(ranks), 0).unsqueeze(0)  # exact Zipf(1.3)
    teacher = _topk_of(lp, k)
    model = tail_model(teacher, v)
    assert abs(float(model.exponent[0]) - 1.3) < 0.05
    dense = dense_teacher(teacher, v, torch.float64)
    torch.testing.assert_close(torch.logsumexp(dense, 1), torch.zeros(1, dtype=torch.float64))
    true_sorted = lp.exp().sort(descending=True).values
    model_sorted = dense.exp().sort(descending=True).values
    assert float((true_sorted - model_sorted).abs().sum()) < 0.02 * float(teacher.tail_logprob.exp())


def test_dense_teacher_keeps_cached_values_and_tail_mass_with_padding():
    gen = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(4, 50, generator=gen, dtype=torch.float64) * 2, -1)
    values, ids = lp.topk(6, dim=-1)
    plain = merged_topk(ids, values, values[:, 0], torch.arange(4), 4)
    padded = merged_topk(torch.cat([ids, torch.full_like(ids[:, :3], -1)], 1),
                         torch.cat([values, torch.full_like(values[:, :3], float("-inf"))], 1), values[:, 0],
                         torch.arange(4), 4)
    for teacher in (plain, padded):
        dense = dense_teacher(teacher, 50, torch.float64)  # (4, 50)
        assert dense.shape == (4, 50) and torch.isfinite(dense).all()
        assert (dense[:, :-1] >= dense[:, 1:]).all()  # built in descending order (sorted_l1 skips its sort)
        torch.testing.assert_close(torch.logsumexp(dense, 1), torch.zeros(4, dtype=torch.float64))
        top = dense.sort(dim=1, descending=True).values[:, :6]
        torch.testing.assert_close(top, values)  # the tail never exceeds the smallest cached value here
    torch.testing.assert_close(dense_teacher(plain, 50, torch.float64).sort(1).values,
                               dense_teacher(padded, 50, torch.float64).sort(1).values)


def test_topk_losses_track_the_exact_losses_on_a_zipf_pair():
    s_lp, t_lp, pairs = _zipf_pair(0)
    split = vocab_split(pairs, s_lp.shape[1], t_lp.shape[1])
    uld_exact = float(uld_loss(s_lp, t_lp)[0])
    hybrid_exact, exact_diag = hybrid_loss(s_lp, t_lp, split)
    teacher = _topk_of(t_lp, 64)
    assert 0.05 < float(teacher.tail_logprob.exp().mean()) < 0.3  # a real tail to model
    uld_k = float(uld_loss_topk(s_lp, teacher, t_lp.shape[1])[0])
    hybrid_k, diag = hybrid_loss_topk(s_lp, teacher, split)
    old_uld = float(uld_loss(s_lp, teacher.dense_values())[0])  # the former one-bucket tail, for contrast
    assert abs(uld_k - uld_exact) / uld_exact < 0.02 < abs(old_uld - uld_exact) / uld_exact
    # the coarsened tail cell is a lower bound of the matched part, the unassociated placement lies above it here;
    # the reported part is the bracket's midpoint
    assert diag["matched_low"] <= exact_diag["matched"] <= diag["matched_high"]
    assert abs(float(hybrid_k) - float(hybrid_exact)) / float(hybrid_exact) < 0.05
    assert diag["matched"] == pytest.approx((diag["matched_low"] + diag["matched_high"]) / 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # NumPy and torch sort paths
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_sorted_l1_with_a_presorted_teacher_equals_the_sorting_path(dtype, mode):
    from gold_pipeline.losses.uld import sorted_l1

    gen = torch.Generator().manual_seed(4)
    s = torch.log_softmax(torch.randn(6, 300, generator=gen, dtype=dtype) * 2, -1).requires_grad_()
    t = torch.log_softmax(torch.randn(6, 400, generator=gen, dtype=dtype) * 2, -1)
    t[:, -7:] = float("-inf")
    t_desc = t.sort(dim=1, descending=True).values
    a, _ = sorted_l1(s, t, mode=mode, fast_k=16, fast_tol=None)
    b, _ = sorted_l1(s, t_desc, mode=mode, fast_k=16, fast_tol=None, teacher_sorted=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a.sum(), s)[0], torch.autograd.grad(b.sum(), s)[0])


def test_merge_desc_equals_sorting_the_union():
    from gold_pipeline.losses.topk import _merge_desc

    gen = torch.Generator().manual_seed(7)
    groups, k, width = 9, 6, 40
    count = torch.tensor([6, 0, 3, 6, 1, 5, 2, 6, 4])
    cached = torch.randn(groups, k, generator=gen, dtype=torch.float64)
    cached = cached.masked_fill(torch.arange(k).unsqueeze(0) >= count.unsqueeze(1), float("-inf"))
    cached = cached.gather(1, torch.argsort(torch.rand(groups, k, generator=gen), dim=1))  # any order
    tail = torch.randn(groups, width, generator=gen, dtype=torch.float64).sort(1, descending=True).values - 0.5
    tail = tail.masked_fill(torch.arange(width).unsqueeze(0) >= (width - count).unsqueeze(1), float("-inf"))
    got = _merge_desc(cached, count, tail, width)
    expected = torch.cat([cached, tail], 1).sort(1, descending=True).values[:, :width]
    torch.testing.assert_close(got, expected)
    assert torch.isfinite(got).all()


# ------------------------------------------------------------------------------- NumPy kernels (CPU float32) --
def _kernel_case(seed, k, vs=300, vt=400, matched=150, groups=12):
    """A cross-tokenizer pair with padded and empty cache rows, merged student log-probs (float64)."""
    s_logits, t_logits, s_tok, t_tok, s_gid, t_gid, _, g = _case(seed, vs=vs, vt=vt, groups=groups)
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.stack([torch.randperm(vs, generator=gen)[:matched], torch.randperm(vt, generator=gen)[:matched]], 1)
    teacher = _teacher_topk(t_logits, t_tok, t_gid, g, k, "first")
    ids, logprobs = teacher.ids.clone(), teacher.logprobs.clone()
    ids[0, -2:], logprobs[0, -2:] = -1, float("-inf")  # a server returned fewer alternatives
    ids[3, 1:], logprobs[3, 1:] = -1, float("-inf")  # only one
    teacher = TopkMerged(ids, logprobs, teacher.tail_logprob)
    s_m = merged_logprobs_from_logits(s_logits, s_tok, s_gid, g, "first").detach()
    return s_m, teacher, vocab_split(pairs, vs, vt)


def _loss_and_grad(fn, s_m, teacher, dtype):
    s = s_m.to(dtype).requires_grad_()
    loss, diag = fn(s, TopkMerged(teacher.ids, teacher.logprobs.to(dtype), teacher.tail_logprob.to(dtype)))
    return loss.double(), torch.autograd.grad(loss, s)[0].double(), diag


@pytest.mark.parametrize("k", [4, 16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_numpy_kernels_equal_the_torch_path(k, beta):
    # float32 on CPU takes the NumPy kernels (topk_numpy), float64 the torch reference path
    s_m, teacher, split = _kernel_case(k, k)
    for fn in (lambda s, t: hybrid_loss_topk(s, t, split, beta=beta), lambda s, t: uld_loss_topk(s, t, 400)):
        loss64, grad64, diag64 = _loss_and_grad(fn, s_m, teacher, torch.float64)
        loss32, grad32, diag32 = _loss_and_grad(fn, s_m, teacher, torch.float32)
        torch.testing.assert_close(loss32, loss64, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad32, grad64, rtol=1e-4, atol=1e-6 * float(grad64.abs().max()))
        for key in ("matched_low", "matched_high", "unmatched"):
            if key in diag64:
                assert diag32[key] == pytest.approx(diag64[key], rel=1e-5, abs=1e-8)


def test_numpy_teacher_rows_merge_a_tail_that_starts_above_a_cached_value():
    # the tail is scaled to its mass, so its first values can exceed the smallest cached entry: the kernel's rows
    # must still come out descending and equal the torch merge
    from gold_pipeline.losses.topk import TailModel, _merge_desc, _tail_block
    from gold_pipeline.losses.topk_numpy import _offsets_by_k, _teacher_desc_rows, grid_positions

    width, vocab = 50, 60
    cached = torch.tensor([[-1.0, -9.0, -2.0, float("-inf")], [-0.5, -1.5, float("-inf"), float("-inf")]])
    count = torch.tensor([3, 2])
    slots = width - count
    model = TailModel(count=torch.tensor([4, 4]), log_kth=torch.tensor([-9.0, -9.0], dtype=torch.float64),
                      exponent=torch.tensor([0.2, 1.5], dtype=torch.float64),
                      log_mass=torch.tensor([-1.5, -2.0], dtype=torch.float64), vocab_size=vocab)
    expected = _merge_desc(cached, count, _tail_block(model, slots, model.log_mass, torch.float32, width),
                           width).exp()
    offsets = _offsets_by_k(model.count.numpy(), grid_positions(width), vocab)
    got = _teacher_desc_rows(cached.numpy(), count.numpy(), slots.numpy(), model.exponent.numpy(),
                             model.log_mass.numpy(), model.count.numpy(), offsets, width)
    assert float(expected[0, 3]) > float(torch.tensor(-9.0).exp())  # the case under test: tail above a cached value
    assert (got[:, :-1] >= got[:, 1:]).all()
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-9)
