"""Properties and equivalences of gold_pipeline.losses (DESIGN §3-4)."""

from __future__ import annotations

import math

import pytest
import torch

from gold_pipeline.losses import (
    cross_entropy_loss,
    generalized_jsd_loss,
    hybrid_loss,
    merged_logprobs,
    merged_logprobs_from_logits,
    sorted_l1,
    uld_loss,
    vocab_split,
)

STRATEGIES = ("first", "last")


def _random_case(seed, n=12, g=5, vocab=7):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 4, (g,), generator=gen)
    group_ids = torch.repeat_interleave(torch.arange(g), sizes)
    excluded = torch.full((2,), -1)
    group_ids = torch.cat([group_ids[:3], excluded[:1], group_ids[3:], excluded[1:]])  # excluded tokens mid and end
    n = group_ids.shape[0]
    logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2
    tokens = torch.randint(0, vocab, (n,), generator=gen)
    return logits, tokens, group_ids, g


def _loop_merge(logprobs, tokens, group_ids, g, strategy):
    out = []
    for gid in range(g):
        pos = (group_ids == gid).nonzero().squeeze(1).tolist()
        base = pos[0] if strategy == "first" else pos[-1]
        scalar = sum(float(logprobs[p, tokens[p]]) for p in pos if p != base)
        out.append(logprobs[base] + scalar)
    return torch.stack(out)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vectorized_merge_equals_per_group_loop(strategy):
    logits, tokens, group_ids, g = _random_case(1)
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(merged_logprobs(lp, tokens, group_ids, g, strategy),
                               _loop_merge(lp, tokens, group_ids, g, strategy))


def test_merge_rejects_a_group_without_tokens():
    lp = torch.log_softmax(torch.randn(3, 4), -1)
    with pytest.raises(ValueError, match="group 1 owns no token"):
        merged_logprobs(lp, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 2]), 3)
    with pytest.raises(ValueError, match="num_groups"):
        merged_logprobs(lp, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="'first'"):
        merged_logprobs(lp, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 3, "observed")


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_identical_tokenizers_one_token_groups_hybrid_matched_equals_generalized_jsd(beta):
    gen = torch.Generator().manual_seed(2)
    n, vocab = 9, 6
    s_logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    t_logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (n,), generator=gen)
    group_ids = torch.tensor([0, 1, 2, -1, 3, 4, 5, 6, 7])
    identity = torch.arange(vocab).repeat(2, 1).T  # every id matched with itself
    s_m = merged_logprobs_from_logits(s_logits, tokens, group_ids, 8)
    t_m = merged_logprobs_from_logits(t_logits, tokens, group_ids, 8)
    loss, diag = hybrid_loss(s_m, t_m, identity, beta=beta, log_floor=None)
    expected, _ = generalized_jsd_loss(s_logits, t_logits, beta=beta, mask=group_ids >= 0)
    assert diag["matched_weight"] == 1.0 and diag["unmatched"] == 0.0
    torch.testing.assert_close(loss, expected)
    assert diag["matched"] == pytest.approx(float(expected))


def _two_sided(seed, n_groups=6, vs=9, vt=11):
    gen = torch.Generator().manual_seed(seed)
    s_sizes = torch.randint(1, 3, (n_groups,), generator=gen)
    t_sizes = torch.randint(1, 3, (n_groups,), generator=gen)
    s_gid = torch.repeat_interleave(torch.arange(n_groups), s_sizes)
    t_gid = torch.repeat_interleave(torch.arange(n_groups), t_sizes)
    s_logits = (torch.randn(len(s_gid), vs, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    t_logits = torch.randn(len(t_gid), vt, generator=gen, dtype=torch.float64) * 2
    s_tok = torch.randint(0, vs, (len(s_gid),), generator=gen)
    t_tok = torch.randint(0, vt, (len(t_gid),), generator=gen)
    pairs = torch.tensor([[0, 3], [1, 1], [4, 0], [6, 10], [8, 5]])
    return s_logits, t_logits, s_tok, t_tok, s_gid, t_gid, pairs


def _merged(logits, tok, gid, g, strategy="first"):
    return merged_logprobs_from_logits(logits, tok, gid, g, strategy)


@pytest.mark.parametrize("loss_name", ["uld", "hybrid", "uld_fast"])
def test_gradient_accumulation_equals_one_big_batch(loss_name):
    """Two micro-batches, each divided by the window's total group count, give the big batch's gradient."""
    s_logits, t_logits, s_tok, t_tok, s_gid, t_gid, pairs = _two_sided(3, n_groups=8, vs=40, vt=50)

    def loss_of(s_rows, t_rows, s_ids, t_ids, s_groups, t_groups, denominator):
        g = int(s_groups.max()) + 1
        s_m, t_m = _merged(s_rows, s_ids, s_groups, g), _merged(t_rows, t_ids, t_groups, g)
        if loss_name == "hybrid":
            return hybrid_loss(s_m, t_m, pairs, beta=0.5, denominator=denominator)[0]
        # fast mode per group (fast_tol=None): the tolerance fallback picks groups per call, i.e. per micro-batch
        return uld_loss(s_m, t_m, denominator=denominator, mode="fast" if loss_name == "uld_fast" else "exact",
                        fast_k=5, fast_tol=None)[0]

    big = loss_of(s_logits, t_logits, s_tok, t_tok, s_gid, t_gid, None)
    (grad_big,) = torch.autograd.grad(big, s_logits)
    # split after group 3 (groups 0..3 | 4..7, renumbered per micro-batch); window total = 8 groups
    s_cut, t_cut = int((s_gid < 4).sum()), int((t_gid < 4).sum())
    grad_acc = torch.zeros_like(s_logits)
    total = 0.0
    for s_sl, t_sl, offset in ((slice(0, s_cut), slice(0, t_cut), 0), (slice(s_cut, None), slice(t_cut, None), 4)):
        part = loss_of(s_logits[s_sl], t_logits[t_sl], s_tok[s_sl], t_tok[t_sl], s_gid[s_sl] - offset,
                       t_gid[t_sl] - offset, 8)
        grad_acc += torch.autograd.grad(part, s_logits)[0]
        total += float(part.detach())
    assert total == pytest.approx(float(big.detach()))
    torch.testing.assert_close(grad_acc, grad_big)


def test_gradient_accumulation_jsd_and_ce():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(10, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (10,), generator=gen)
    labels[2] = -100
    mask = labels != -100
    for fn in (lambda a, b, m, lab, d: generalized_jsd_loss(a, b, beta=0.5, mask=m, denominator=d)[0],
               lambda a, b, m, lab, d: cross_entropy_loss(a, lab, denominator=d)[0]):
        big = fn(s, t, mask, labels, None)
        g_big = torch.autograd.grad(big, s)[0]
        parts = [fn(s[a:b], t[a:b], mask[a:b], labels[a:b], int(mask.sum())) for a, b in ((0, 4), (4, 10))]
        g_acc = torch.autograd.grad(parts[0] + parts[1], s)[0]
        torch.testing.assert_close(g_acc, g_big)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck_merge_uld_and_hybrid(strategy):
    s_logits, t_logits, s_tok, t_tok, s_gid, t_gid, pairs = _two_sided(5, n_groups=4, vs=6, vt=7)
    t_m = _merged(t_logits, t_tok, t_gid, 4, strategy)

    def uld(x):
        return uld_loss(_merged(x, s_tok, s_gid, 4, strategy), t_m)[0]

    def hybrid(x):
        return hybrid_loss(_merged(x, s_tok, s_gid, 4, strategy), t_m, pairs[:3], beta=0.4)[0]

    assert torch.autograd.gradcheck(uld, (s_logits,))
    assert torch.autograd.gradcheck(hybrid, (s_logits,))


def test_gradcheck_sorted_l1_both_sides_and_jsd():
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sorted_l1(a, b)[0], (s, t))
    t2 = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    for beta in (0.0, 0.5, 1.0):
        assert torch.autograd.gradcheck(lambda a, b: generalized_jsd_loss(a, b, beta=beta, temperature=1.7)[0], (s, t2))


def test_losses_finite_when_probabilities_underflow():
    """-inf logits (banned ids), underflowing merged products and -inf rows give finite losses and gradients."""
    s_logits = torch.tensor([[0.0, 1.0, -math.inf, 2.0, -math.inf, 0.5],
                             [3.0, -math.inf, 0.0, 1.0, -1.0, -math.inf],
                             [-200.0, 0.0, 0.0, 1.0, 2.0, -math.inf]], dtype=torch.float64, requires_grad=True)
    t_logits = torch.tensor([[0.0, -math.inf, 1.0, -math.inf, 2.0, 0.5, -math.inf],
                             [1.0, 0.0, -math.inf, 2.0, -math.inf, 0.0, 1.0],
                             [0.0, 0.0, 1.0, -math.inf, 0.0, 0.0, -300.0]], dtype=torch.float64)
    s_tok = torch.tensor([1, 1, 0])  # token 1 has probability 0 at row 1, token 0 underflows at row 2
    t_tok = torch.tensor([0, 2, 6])
    gid = torch.tensor([0, 0, 1])
    pairs = torch.tensor([[0, 0], [2, 1], [3, 2], [4, 4]])
    for strategy in STRATEGIES:
        s_m = merged_logprobs_from_logits(s_logits, s_tok, gid, 2, strategy)
        t_m = merged_logprobs_from_logits(t_logits, t_tok, gid, 2, strategy)
        for loss, _ in (uld_loss(s_m, t_m), uld_loss(s_m, t_m, mode="fast", fast_k=2),
                        hybrid_loss(s_m, t_m, pairs, beta=0.5), hybrid_loss(s_m, t_m, pairs, beta=0.0),
                        hybrid_loss(s_m, t_m, pairs, beta=1.0)):
            (grad,) = torch.autograd.grad(loss, s_logits, retain_graph=True)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), strategy
    same_t = s_logits.detach().clone()
    same_t[0, 1] = 0.0
    for beta in (0.0, 0.5, 1.0):  # banned ids shared by both sides: 0 * log(0/0) = 0
        loss, _ = generalized_jsd_loss(s_logits, s_logits.detach() * 0.5, beta=beta)
        (grad,) = torch.autograd.grad(loss, s_logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss, _ = cross_entropy_loss(s_logits, torch.tensor([0, 0, 4]))
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, s_logits)[0]).all()


def test_exact_numpy_sort_path_equals_torch_sort_path():
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(40, 3001, generator=gen).log_softmax(-1).requires_grad_()
    t = torch.randn(40, 2500, generator=gen).mul(3).log_softmax(-1)
    l32, _ = sorted_l1(s, t)  # float32 CPU: NumPy packed-key sort
    (g32,) = torch.autograd.grad(l32.sum(), s)
    s64 = s.detach().double().requires_grad_()
    l64, _ = sorted_l1(s64, t.double())  # float64: torch.sort
    (g64,) = torch.autograd.grad(l64.sum(), s64)
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # torch.topk path / NumPy argpartition path
def test_fast_uld_within_reported_bound_and_exact_when_k_covers_vocab(dtype):
    gen = torch.Generator().manual_seed(8)
    s = (torch.randn(16, 2000, generator=gen, dtype=torch.float64) * 3).log_softmax(-1).to(dtype)
    t = (torch.randn(16, 2400, generator=gen, dtype=torch.float64) * 3.5).log_softmax(-1).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    exact, _ = uld_loss(s, t)
    for k in (10, 100, 500):
        fast, diag = uld_loss(s, t, mode="fast", fast_k=k, fast_tol=None)
        assert float(fast) <= float(exact) + tol  # the tail term is a lower bound
        assert float(exact) - float(fast) <= diag["fast_error_bound"] + tol
        guarded, diag = uld_loss(s, t, mode="fast", fast_k=k, fast_tol=1e-3)  # bound-checked fallback per group
        assert abs(float(guarded) - float(exact)) <= 1e-3 * float(exact) + tol
        assert diag["fast_error_bound"] <= 1e-3 * float(guarded) + tol
    full, _ = uld_loss(s, t, mode="fast", fast_k=2000)
    torch.testing.assert_close(full, exact)


def test_fast_uld_numpy_and_torch_paths_agree():
    gen = torch.Generator().manual_seed(9)
    s = (torch.randn(8, 3000, generator=gen, dtype=torch.float64) * 3).log_softmax(-1)
    t = (torch.randn(8, 2500, generator=gen, dtype=torch.float64) * 3).log_softmax(-1)
    s32 = s.float().requires_grad_()
    s64 = s32.detach().double().requires_grad_()
    l32, st32 = sorted_l1(s32, t.float(), mode="fast", fast_k=64, fast_tol=None)
    l64, st64 = sorted_l1(s64, t.float().double(), mode="fast", fast_k=64, fast_tol=None)
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st32["bound"], st64["bound"], rtol=1e-4, atol=1e-6)
    g32 = torch.autograd.grad(l32.sum(), s32)[0]
    g64 = torch.autograd.grad(l64.sum(), s64)[0]
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-6)


def test_vocab_split_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="teacher ids must lie in"):
        vocab_split(torch.tensor([[0, 9]]), 5, 9)
    with pytest.raises(ValueError, match="both be None"):
        hybrid_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0, 0]]), matched_weight=0.5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_floored_matched_jsd_gradient_equals_autograd_of_the_formula(beta):
    from gold_pipeline.losses._common import TRL_LOG_FLOOR, generalized_jsd_terms

    gen = torch.Generator().manual_seed(11)
    s = (torch.randn(4, 9, generator=gen, dtype=torch.float64) * 6).log_softmax(-1).requires_grad_()
    t = (torch.randn(4, 9, generator=gen, dtype=torch.float64) * 6).log_softmax(-1)
    assert bool((s < TRL_LOG_FLOOR).any())  # some entries sit below the floor
    identity = vocab_split(torch.arange(9).repeat(2, 1).T, 9, 9)
    loss, _ = hybrid_loss(s, t, identity, beta=beta)  # fused path (teacher without grad)
    reference = generalized_jsd_terms(s.clamp_min(TRL_LOG_FLOOR), t.clamp_min(TRL_LOG_FLOOR), beta).sum() / 4
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(reference, s)[0])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merge_from_logits_hand_written_backward_passes_gradcheck(strategy):
    logits, tokens, group_ids, g = _random_case(12)
    logits.requires_grad_()
    weights = torch.randn(g, logits.shape[1], dtype=torch.float64)

    def fn(x):
        return (merged_logprobs_from_logits(x, tokens, group_ids, g, strategy, temperature=1.3) * weights).sum()

    assert torch.autograd.gradcheck(fn, (logits,))
    reference = (merged_logprobs(torch.log_softmax(logits / 1.3, -1), tokens, group_ids, g, strategy) * weights).sum()
    torch.testing.assert_close(torch.autograd.grad(fn(logits), logits)[0], torch.autograd.grad(reference, logits)[0])


def test_merge_from_logits_one_token_groups_fast_path_gradcheck():
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (6,), generator=gen)
    weights = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    for temperature in (1.0, 0.7):
        def fn(x):
            return (merged_logprobs_from_logits(x, tokens, torch.arange(6), 6, "first", temperature) * weights).sum()

        assert torch.autograd.gradcheck(fn, (logits,))
        torch.testing.assert_close(merged_logprobs_from_logits(logits, tokens, torch.arange(6), 6),
                                   torch.log_softmax(logits, -1))
