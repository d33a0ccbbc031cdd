"""Golden values hand-computed on 3-4-token vocabularies for every merge strategy and loss."""

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
    uld_loss,
)

LN = math.log


def _lp(*rows):
    return torch.tensor(rows, dtype=torch.float64).log()


# the seed's worked example: "HF" then "1"; student tokens x0 = id 0 ("HF"), x1 = id 1 ("1"), one group
SEED_ROWS = _lp([0.6, 0.3, 0.1], [0.05, 0.9, 0.05])
SEED_TOKENS = torch.tensor([0, 1])
SEED_GROUPS = torch.tensor([0, 0])


def test_seed_example_first_position_merge():
    merged = merged_logprobs(SEED_ROWS, SEED_TOKENS, SEED_GROUPS, 1, "first")
    torch.testing.assert_close(merged.exp(), torch.tensor([[0.54, 0.27, 0.09]], dtype=torch.float64))


def test_seed_example_last_position_merge():
    # P(x1 | HF) * P(x0 = HF) = [0.05, 0.9, 0.05] * 0.6
    merged = merged_logprobs(SEED_ROWS, SEED_TOKENS, SEED_GROUPS, 1, "last")
    torch.testing.assert_close(merged.exp(), torch.tensor([[0.03, 0.54, 0.03]], dtype=torch.float64))


def test_merge_from_logits_equals_merge_of_log_softmax():
    logits = SEED_ROWS + torch.tensor([[1.0], [-2.0]], dtype=torch.float64)  # unnormalized rows
    for strategy in ("first", "last"):
        a = merged_logprobs_from_logits(logits, SEED_TOKENS, SEED_GROUPS, 1, strategy)
        b = merged_logprobs(torch.log_softmax(logits, -1), SEED_TOKENS, SEED_GROUPS, 1, strategy)
        torch.testing.assert_close(a, b)


def test_merge_three_groups_with_excluded_token():
    # tokens: [a] [b c d] [EOS -> -1] [e]; rows are arbitrary 3-way distributions
    rows = _lp([0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.4, 0.4, 0.2], [0.3, 0.3, 0.4], [0.2, 0.6, 0.2],
               [0.6, 0.2, 0.2])
    tokens = torch.tensor([1, 2, 0, 2, 1, 0])
    groups = torch.tensor([0, 1, 1, 1, -1, 2])
    first = merged_logprobs(rows, tokens, groups, 3, "first").exp()
    last = merged_logprobs(rows, tokens, groups, 3, "last").exp()
    expected_first = torch.tensor([[0.5, 0.25, 0.25],
                                   [0.1 * 0.4 * 0.4, 0.2 * 0.4 * 0.4, 0.7 * 0.4 * 0.4],
                                   [0.6, 0.2, 0.2]], dtype=torch.float64)
    expected_last = torch.tensor([[0.5, 0.25, 0.25],
                                  [0.3 * 0.7 * 0.4, 0.3 * 0.7 * 0.4, 0.4 * 0.7 * 0.4],
                                  [0.6, 0.2, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(first, expected_first)
    torch.testing.assert_close(last, expected_last)


def test_uld_golden_seed_student_against_four_token_teacher():
    student = torch.tensor([[0.54, 0.27, 0.09]], dtype=torch.float64).log()
    teacher = _lp([0.1, 0.5, 0.2, 0.2])
    # sorted: [.54 .27 .09 0] vs [.5 .2 .2 .1] -> .04 + .07 + .11 + .10
    loss, diag = uld_loss(student, teacher)
    assert float(loss) == pytest.approx(0.32)
    assert diag["groups"] == 1
    loss2, _ = uld_loss(torch.cat([student, student]), torch.cat([teacher, teacher]), denominator=4, weight=3.0)
    assert float(loss2) == pytest.approx(3.0 * 2 * 0.32 / 4)


def test_hybrid_golden():
    student = torch.tensor([[0.54, 0.27, 0.09]], dtype=torch.float64).log()
    teacher = _lp([0.5, 0.1, 0.2, 0.2])
    pairs = torch.tensor([[0, 0], [1, 2]])  # student 0 <-> teacher 0, student 1 <-> teacher 2
    # matched columns: s [.54 .27], t [.5 .2]; unmatched: s [.09] vs t [.1 .2] -> sorted |.09-.2| + |0-.1| = .21
    kl_ts = 0.5 * LN(0.5 / 0.54) + 0.2 * LN(0.2 / 0.27)
    kl_st = 0.54 * LN(0.54 / 0.5) + 0.27 * LN(0.27 / 0.2)
    m = [0.5 * 0.54 + 0.5 * 0.5, 0.5 * 0.27 + 0.5 * 0.2]
    jsd = 0.5 * (0.5 * LN(0.5 / m[0]) + 0.2 * LN(0.2 / m[1])) + 0.5 * (0.54 * LN(0.54 / m[0]) + 0.27 * LN(0.27 / m[1]))
    for beta, matched in ((0.0, kl_ts), (1.0, kl_st), (0.5, jsd)):
        loss, diag = hybrid_loss(student, teacher, pairs, beta=beta)
        assert diag["matched"] == pytest.approx(matched)
        assert diag["unmatched"] == pytest.approx(0.21)
        assert diag["matched_weight"] == pytest.approx(2 / 4)
        assert float(loss) == pytest.approx(0.5 * matched + 0.5 * 0.21)
    loss, diag = hybrid_loss(student, teacher, pairs, beta=0.0, matched_weight=2.0, unmatched_weight=0.5)
    assert float(loss) == pytest.approx(2.0 * kl_ts + 0.5 * 0.21)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_golden(beta):
    s = _lp([0.5, 0.25, 0.25])
    t = _lp([0.25, 0.5, 0.25])
    expected = {0.0: 0.25 * LN(2), 1.0: 0.25 * LN(2),
                0.5: 0.25 * LN(0.25 / 0.375) + 0.5 * LN(0.5 / 0.375)}[beta]  # KL(t||m) = KL(s||m) by symmetry
    loss, diag = generalized_jsd_loss(s, t, beta=beta)
    assert float(loss) == pytest.approx(expected)
    # temperature 2 divides the logits: log-probs / 2 renormalized
    loss_t, _ = generalized_jsd_loss(s * 2, t * 2, beta=beta, temperature=2.0)
    assert float(loss_t) == pytest.approx(expected)


def test_generalized_jsd_beta_zero_is_forward_kl_and_one_is_reverse_kl():
    s = _lp([0.7, 0.2, 0.1])
    t = _lp([0.2, 0.2, 0.6])
    fwd = sum(b * LN(b / a) for a, b in zip([0.7, 0.2, 0.1], [0.2, 0.2, 0.6]))
    rev = sum(a * LN(a / b) for a, b in zip([0.7, 0.2, 0.1], [0.2, 0.2, 0.6]))
    assert float(generalized_jsd_loss(s, t, beta=0.0)[0]) == pytest.approx(fwd)
    assert float(generalized_jsd_loss(s, t, beta=1.0)[0]) == pytest.approx(rev)


def test_cross_entropy_golden():
    logits = _lp([0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6])
    labels = torch.tensor([1, -100, 2])
    loss, diag = cross_entropy_loss(logits, labels)
    assert float(loss) == pytest.approx((LN(4) + -LN(0.6)) / 2)
    assert diag["tokens"] == 2
    loss, _ = cross_entropy_loss(logits, labels, mask=torch.tensor([True, True, False]), denominator=4, weight=0.5)
    assert float(loss) == pytest.approx(0.5 * LN(4) / 4)


def test_paired_end_of_turn_columns_pull_the_student_towards_stopping():
    # Why the trainer pairs the end-of-turn columns of a stop group (text.pair.end_of_turn_pair): the teacher ends
    # the turn (p 0.96 on its end-of-turn id 4), the student prefers another unmatched token (5). Left to ULD, the
    # sorted L1 pairs the teacher's 0.96 with the student's largest unmatched value and pushes the student's
    # end-of-turn probability down; as a matched pair, the JSD pushes it up.
    from gold_pipeline.losses import hybrid_loss

    teacher = torch.tensor([[0.01, 0.01, 0.01, 0.01, 0.96, 0.0]]).clamp_min(1e-12).log()  # (G=1, Vt=6)
    words = torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3]])
    for pairs, sign in ((words, 1.0), (torch.cat([words, torch.tensor([[4, 4]])]), -1.0)):
        logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 3.0]], requires_grad=True)  # (G=1, Vs=6)
        loss, _ = hybrid_loss(logits.log_softmax(-1), teacher, pairs, beta=0.5)
        loss.backward()
        assert float(logits.grad[0, 4]) * sign > 0  # d loss / d (student end-of-turn logit)
