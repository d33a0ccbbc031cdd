"""Parity of gold_pipeline.losses with TRL 1.16's GOLD implementation on the same inputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gold_pipeline.losses import generalized_jsd_loss, hybrid_loss, merged_logprobs, uld_loss

trl_gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
GOLDTrainer, ULDLoss = trl_gold.GOLDTrainer, trl_gold.ULDLoss


def _config(strategy: str, hybrid: bool, s_temp: float, t_temp: float, beta: float = 0.5, weights=(None, None)):
    return SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=s_temp,
        uld_teacher_temperature=t_temp, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=True, uld_token_merge_strategy=strategy, uld_use_hybrid_loss=hybrid,
        uld_hybrid_matched_weight=weights[0], uld_hybrid_unmatched_weight=weights[1], beta=beta)


def _offsets_from_groups(student_sizes, teacher_sizes):
    """Byte offsets whose only common token ends are the group ends (internal ends odd vs even)."""
    s_off, t_off, start = [], [], 0
    for k, m in zip(student_sizes, teacher_sizes):
        length = 2 * (k + m)
        s_ends = [start + 2 * i + 1 for i in range(k - 1)] + [start + length]
        t_ends = [start + 2 * (i + 1) for i in range(m - 1)] + [start + length]
        for ends, out in ((s_ends, s_off), (t_ends, t_off)):
            prev = start
            for e in ends:
                out.append((prev, e))
                prev = e
        start += length
    return s_off, t_off


def _group_ids(sizes):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def _trl_inputs(sizes, vocab, prompt_len, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    total = prompt_len + n
    logits = torch.randn(1, total, vocab, generator=gen, dtype=torch.float64) * 2
    ids = torch.randint(0, vocab, (1, total), generator=gen)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return logits, ids, labels


def _case(seed=0):
    student_sizes = [1, 2, 1, 3, 1]
    teacher_sizes = [2, 1, 1, 1, 2]
    s_logits, s_ids, s_labels = _trl_inputs(student_sizes, 11, prompt_len=3, seed=seed)
    t_logits, t_ids, t_labels = _trl_inputs(teacher_sizes, 13, prompt_len=4, seed=seed + 1)
    s_off, t_off = _offsets_from_groups(student_sizes, teacher_sizes)
    s_offsets = torch.zeros(1, s_ids.shape[1], 2, dtype=torch.long)
    t_offsets = torch.zeros(1, t_ids.shape[1], 2, dtype=torch.long)
    s_offsets[0, 3:] = torch.tensor(s_off)
    t_offsets[0, 4:] = torch.tensor(t_off)
    return SimpleNamespace(student_sizes=student_sizes, teacher_sizes=teacher_sizes, s_logits=s_logits, s_ids=s_ids,
                           s_labels=s_labels, t_logits=t_logits, t_ids=t_ids, t_labels=t_labels, s_offsets=s_offsets,
                           t_offsets=t_offsets, s_prompt=3, t_prompt=4)


def _trl_loss(case, config, vocab_pairs=None):
    loss_fn = ULDLoss(config)
    if vocab_pairs is not None:  # the same vocab map, injected (TRL builds it from token strings)
        mapping = {int(t): int(s) for s, t in vocab_pairs}
        loss_fn._vocab_mapping = mapping
        loss_fn._teacher_matched_ids = set(mapping)
        loss_fn._student_matched_ids = set(mapping.values())
        loss_fn.mapping_tensor = torch.full((max(mapping) + 1,), -1, dtype=torch.long)
        for t, s in mapping.items():
            loss_fn.mapping_tensor[t] = s
    return loss_fn(case.s_logits, case.t_logits, case.s_labels, case.t_labels, case.s_ids, case.t_ids,
                   student_byte_offsets=case.s_offsets, teacher_byte_offsets=case.t_offsets)


def _ours_merged(case, s_temp, t_temp, strategy="last", shift=1):
    """Flat rows: row i predicts completion token i (shift=1); shift=0 reproduces TRL's "observed" slicing."""
    n_s, n_t = sum(case.student_sizes), sum(case.teacher_sizes)
    s_rows = case.s_logits[0, case.s_prompt - shift: case.s_prompt - shift + n_s]
    t_rows = case.t_logits[0, case.t_prompt - shift: case.t_prompt - shift + n_t]
    s_lp = torch.log_softmax(s_rows / s_temp, dim=-1)
    t_lp = torch.log_softmax(t_rows / t_temp, dim=-1)
    g = len(case.student_sizes)
    s_m = merged_logprobs(s_lp, case.s_ids[0, case.s_prompt:], _group_ids(case.student_sizes), g, strategy)
    t_m = merged_logprobs(t_lp, case.t_ids[0, case.t_prompt:], _group_ids(case.teacher_sizes), g, strategy)
    return s_m, t_m


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_generalized_jsd_matches_trl(beta, temperature):
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[0, :2] = -100
    expected = GOLDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    mask = (labels != -100).reshape(-1)
    ours, diag = generalized_jsd_loss(s.reshape(-1, 7), t.reshape(-1, 7), beta=beta, temperature=temperature,
                                      mask=mask)
    torch.testing.assert_close(ours, expected.float() if ours.dtype == torch.float32 else expected, rtol=1e-5,
                               atol=1e-6)
    assert diag["tokens"] == int(mask.sum())


@pytest.mark.parametrize("temps", [(1.0, 1.0), (0.8, 1.5)])
def test_uld_matches_trl_bayesian(temps):
    case = _case()
    expected = _trl_loss(case, _config("bayesian", False, *temps))
    s_m, t_m = _ours_merged(case, *temps, strategy="last")
    ours, diag = uld_loss(s_m, t_m)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert diag["groups"] == len(case.student_sizes)


@pytest.mark.parametrize("weights", [(None, None), (0.7, 0.4)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_hybrid_matches_trl_bayesian(weights, beta):
    case = _case(seed=5)
    pairs = torch.tensor([[0, 1], [2, 2], [3, 7], [5, 4], [9, 12], [10, 0]])  # [student_id, teacher_id]
    expected = _trl_loss(case, _config("bayesian", True, 0.9, 1.3, beta=beta, weights=weights), vocab_pairs=pairs)
    s_m, t_m = _ours_merged(case, 0.9, 1.3, strategy="last")
    ours, diag = hybrid_loss(s_m, t_m, pairs, beta=beta, matched_weight=weights[0], unmatched_weight=weights[1])
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    if weights[0] is None:
        assert diag["matched_weight"] == pytest.approx(6 / 13)


def test_trl_observed_mode_is_shifted_by_one_position_trl5152():
    """TRL's default "observed" strategy reads the logit row AT token a (which predicts token a+1) as the
    distribution of token a: it equals our "first" merge fed rows shifted one position late, not our "first"."""
    case = _case(seed=9)
    expected = _trl_loss(case, _config("observed", False, 1.0, 1.0))
    late_s, late_t = _ours_merged(case, 1.0, 1.0, strategy="first", shift=0)  # TRL's slicing
    shifted, _ = uld_loss(late_s, late_t)
    torch.testing.assert_close(shifted, expected, rtol=1e-10, atol=1e-12)
    right_s, right_t = _ours_merged(case, 1.0, 1.0, strategy="first", shift=1)  # row before a token predicts it
    correct, _ = uld_loss(right_s, right_t)
    assert abs(float(correct) - float(expected)) > 1e-3
