"""Top-k teacher forms of the losses (teacher read from the cache instead of a live forward pass; DESIGN §4).

At each teacher completion position i the cache holds K token ids ``topk_ids[i]`` with log-probabilities
``topk_logprobs[i]`` (at the training temperature) and the log-probability of the ACTUAL next teacher token
``token_logprobs[i]`` (needed by the merge; it may lie outside the top-k). The rest of the vocabulary is one tail
bucket of mass ``1 - sum(exp(topk_logprobs[i]))``.

Merging (``merged_topk``) keeps the base row's K entries and tail and adds the same scalar continuation
log-probability as ``merged_logprobs``; the merged teacher is therefore K known entries plus one tail bucket per group.

Loss forms and their error against the exact loss with the full teacher distribution (T = teacher tail mass of the
row, S = student mass outside the teacher's top-k ids):

* ``uld_loss_topk``: the teacher "vector" is its K values plus the tail bucket as one extra entry. Sorted L1 is a
  metric on multisets, so ``|topk - exact| <= 2 T`` per group (reported as ``diag["topk_error_bound"]``).
* ``generalized_jsd_loss_topk`` (same tokenizer): both distributions are coarsened onto the teacher's K ids plus one
  tail cell. Coarsening never increases a divergence, so ``0 <= exact - topk``; for 0 < beta < 1 also
  ``exact - topk <= ln(2) * (beta * T + (1 - beta) * S)`` (the in-tail KLs to the mixture are at most
  ``log(M / (beta T))`` and ``log(M / ((1-beta) S))``). For beta in {0, 1} the gap is the tail mass times a KL
  inside the tail, which mass alone cannot bound.
* ``hybrid_loss_topk``: matched part on the teacher's top-k ids that are matched plus one "matched tail" cell; the
  teacher tail mass is split between the matched tail cell and an unmatched tail bucket in proportion to the numbers
  of matched / unmatched columns outside the top-k; unmatched part = ULD of the student's unmatched columns against
  the teacher's unmatched top-k values plus that bucket (error of the unmatched part <= 2 T per group).

With K = vocabulary size (T = 0) every form equals its exact loss. Cross-entropy needs no teacher distribution.
Teacher temperature: the cache must hold log-probabilities at the training temperature (a top-k slice cannot be
re-tempered without the tail).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import TRL_LOG_FLOOR, Denominator, generalized_jsd_terms, resolve_denominator, upcast
from .hybrid import VocabSplit, hybrid_weights, vocab_split
from .merge import MergeStrategy, _check_inputs, merge_scalars
from .uld import DEFAULT_FAST_K, UldMode, sorted_l1


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x <= 0, stable; x >= 0 (rounding of a full top-k) gives -inf."""
    x = x.clamp_max(0)
    near = x > -math.log(2)
    safe_near = torch.where(near, x, torch.full_like(x, -1.0))
    safe_far = torch.where(near, torch.full_like(x, -1.0), x)
    out = torch.where(near, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))
    return torch.where(x == 0, torch.full_like(x, -math.inf), out)


def tail_logprob(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """(..., K) log-probs -> (...,) log of the remaining mass ``1 - sum(exp)`` (-inf when nothing remains)."""
    return log1mexp(torch.logsumexp(topk_logprobs, dim=-1))


@dataclass(frozen=True)
class TopkMerged:
    """Merged top-k teacher: ids (G, K), logprobs (G, K), tail_logprob (G,) — all merged (unnormalized) values."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor

    def dense_values(self) -> torch.Tensor:
        """(G, K + 1) log-values: the K entries and the tail bucket."""
        return torch.cat([self.logprobs, self.tail_logprob.unsqueeze(1)], dim=1)


def merged_topk(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, token_logprobs: torch.Tensor,
                group_ids: torch.Tensor, num_groups: int, strategy: MergeStrategy = "first") -> TopkMerged:
    """Merge a top-k teacher per alignment group.

    Args:
        topk_ids: (N, K) int teacher ids; row i is the distribution predicting teacher completion token i.
        topk_logprobs: (N, K) their log-probabilities.
        token_logprobs: (N,) log-probability of the actual teacher token i under row i.
        group_ids: (N,) global group ids, -1 = excluded.
        num_groups: G. strategy: "first" (default) or "last" (TRL "bayesian").
    Returns:
        TopkMerged with ids (G, K), logprobs (G, K), tail_logprob (G,).
    """
    if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} must both "
                         "be (N, K).")
    _check_inputs(topk_ids.shape[0], token_logprobs, group_ids, num_groups, strategy)
    base, scalar = merge_scalars(token_logprobs, group_ids, num_groups, strategy)  # (G,), (G,)
    base_lp = topk_logprobs[base]  # (G, K)
    return TopkMerged(ids=topk_ids[base], logprobs=base_lp + scalar.unsqueeze(1),
                      tail_logprob=tail_logprob(base_lp) + scalar)


def uld_loss_topk(student_merged: torch.Tensor, teacher: TopkMerged, *, denominator: Denominator = None,
                  mode: UldMode = "exact", fast_k: int = DEFAULT_FAST_K,
                  weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """ULD with a merged top-k teacher.

    Args:
        student_merged: (G, Vs) merged student log-probabilities.
        teacher: ``merged_topk`` output (G, K) + tail.
    Returns:
        loss scalar (``weight * sum_g uld_g / denominator``); diag: "uld", "groups", "teacher_tail_mass" (mean per
        group), "topk_error_bound" (``weight * 2 * sum_g T_g / denominator``, bounds |loss - exact loss|).
    """
    l1, _ = sorted_l1(student_merged, teacher.dense_values().to(student_merged.dtype), mode=mode, fast_k=fast_k)
    groups = l1.shape[0]
    denom = resolve_denominator(denominator, groups, what="uld_loss_topk")
    loss = l1.sum() / denom
    tail = teacher.tail_logprob.detach().double().exp()
    return weight * loss, {"uld": float(loss.detach()), "groups": float(groups),
                           "teacher_tail_mass": float(tail.sum() / max(groups, 1)),
                           "topk_error_bound": float(weight * 2 * tail.sum() / float(denom))}


def generalized_jsd_loss_topk(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor,
                              teacher_topk_logprobs: torch.Tensor, *, beta: float = 0.5, temperature: float = 1.0,
                              mask: torch.Tensor | None = None, denominator: Denominator = None,
                              weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Generalized JSD of a same-tokenizer student against a cached top-k teacher (K ids + tail cell).

    Args:
        student_logits: (N, V) student logits, row i predicts token i; divided by ``temperature``.
        teacher_topk_ids: (N, K) distinct ids; teacher_topk_logprobs: (N, K) at the training temperature.
        mask: (N,) bool valid tokens; denominator: valid tokens of the optimizer window (None = local count).
    Returns:
        loss scalar; diag: "jsd", "tokens", "teacher_tail_mass", "student_tail_mass" (means per token), and for
        0 < beta < 1 "topk_error_bound" (``ln 2 * (beta T + (1-beta) S)`` summed / denominator).
    """
    n = student_logits.shape[0]
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape or teacher_topk_ids.shape[0] != n:
        raise ValueError(f"teacher top-k ids {tuple(teacher_topk_ids.shape)} / logprobs "
                         f"{tuple(teacher_topk_logprobs.shape)} must be (N, K) with N={n}.")
    if mask is not None:
        idx = mask.bool().nonzero().squeeze(1)
        student_logits = student_logits[idx]
        teacher_topk_ids, teacher_topk_logprobs = teacher_topk_ids[idx], teacher_topk_logprobs[idx]
    s_lp = torch.log_softmax(upcast(student_logits) / temperature, dim=-1)  # (n, V)
    padded = teacher_topk_ids < 0  # (n, K) empty slots (a server returned fewer than K alternatives)
    s_k = s_lp.gather(1, teacher_topk_ids.long().clamp_min(0)).masked_fill(padded, -math.inf)  # (n, K)
    t_k = teacher_topk_logprobs.to(s_k.dtype).masked_fill(padded, -math.inf)
    s_cells = torch.cat([s_k, tail_logprob(s_k).unsqueeze(1)], dim=1)  # (n, K + 1)
    t_cells = torch.cat([t_k, tail_logprob(t_k).unsqueeze(1)], dim=1)
    per_token = generalized_jsd_terms(s_cells, t_cells, beta).sum(1)  # (n,)
    tokens = per_token.shape[0]
    denom = resolve_denominator(denominator, tokens, what="generalized_jsd_loss_topk")
    loss = per_token.sum() / denom
    t_tail = t_cells[:, -1].detach().double().exp()
    s_tail = s_cells[:, -1].detach().double().exp()
    diag = {"jsd": float(loss.detach()), "tokens": float(tokens),
            "teacher_tail_mass": float(t_tail.sum() / max(tokens, 1)),
            "student_tail_mass": float(s_tail.sum() / max(tokens, 1))}
    if 0.0 < beta < 1.0:
        diag["topk_error_bound"] = float(weight * math.log(2) * (beta * t_tail + (1 - beta) * s_tail).sum()
                                         / float(denom))
    return weight * loss, diag


def hybrid_loss_topk(student_merged: torch.Tensor, teacher: TopkMerged, vocab_map, *, beta: float = 0.5,
                     matched_weight: float | None = None, unmatched_weight: float | None = None,
                     denominator: Denominator = None, mode: UldMode = "exact", fast_k: int = DEFAULT_FAST_K,
                     log_floor: float | None = TRL_LOG_FLOOR,
                     weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Hybrid loss with a merged top-k teacher (see module docstring); same weights/floor as ``hybrid_loss``.

    Args:
        student_merged: (G, Vs); teacher: TopkMerged (G, K) + tail; vocab_map: (M, 2) or a ``VocabSplit`` whose
            teacher vocabulary size Vt is the FULL teacher vocabulary (the default weight is M / Vt).
    Returns:
        loss scalar; diag like ``hybrid_loss`` plus "teacher_tail_mass".
    """
    if not isinstance(vocab_map, VocabSplit):
        raise ValueError("hybrid_loss_topk needs a VocabSplit (vocab_split(vocab_map, Vs, Vt)): the full teacher "
                         "vocabulary size Vt cannot be read from a top-k slice.")
    split = vocab_map
    device, dtype = student_merged.device, student_merged.dtype
    w_m, w_u = hybrid_weights(split, matched_weight, unmatched_weight)
    groups = teacher.ids.shape[0]
    denom = resolve_denominator(denominator, groups, what="hybrid_loss_topk")

    t2s = torch.full((split.teacher_vocab_size,), -1, dtype=torch.long, device=device)
    t2s[split.teacher_matched.to(device)] = split.student_matched.to(device)
    ids = teacher.ids.long()  # (G, K); -1 marks an empty slot (fewer than K alternatives cached)
    s_col = torch.where(ids >= 0, t2s[ids.clamp_min(0)], -1)  # (G, K) student column of each id, -1 if unmatched
    is_matched = s_col >= 0
    neg_inf = torch.full((), -math.inf, dtype=dtype, device=device)
    t_lp = teacher.logprobs.to(dtype).masked_fill(ids < 0, -math.inf)
    # share of the teacher tail that falls on matched columns (uniform over the columns outside the top-k)
    outside = (split.teacher_vocab_size - (ids >= 0).sum(1)).clamp_min(1).to(dtype)  # (G,) columns not cached
    rho = ((split.num_matched - is_matched.sum(1)).clamp_min(0).to(dtype) / outside).clamp(0, 1)  # (G,)
    t_tail = teacher.tail_logprob.to(dtype)

    matched = student_merged.new_zeros(())
    if split.num_matched:
        s_k = student_merged.gather(1, s_col.clamp_min(0))  # (G, K)
        s_all = student_merged.index_select(1, split.student_matched.to(device))  # (G, M)
        inside = torch.where(is_matched, s_k, neg_inf).exp().sum(1)  # (G,)
        s_rest = torch.logsumexp(s_all, dim=1).exp() - inside  # student mass on matched columns outside the top-k
        positive = s_rest > 0
        s_rest_log = torch.where(positive, torch.where(positive, s_rest, torch.ones_like(s_rest)).log(), neg_inf)
        s_cells = torch.cat([torch.where(is_matched, s_k, neg_inf), s_rest_log.unsqueeze(1)], dim=1)
        t_cells = torch.cat([torch.where(is_matched, t_lp, neg_inf), (t_tail + rho.log()).unsqueeze(1)], dim=1)
        live = torch.cat([is_matched, torch.ones_like(is_matched[:, :1])], dim=1)  # (G, K + 1)
        if log_floor is not None:
            s_cells, t_cells = s_cells.clamp_min(log_floor), t_cells.clamp_min(log_floor)
        terms = generalized_jsd_terms(s_cells, t_cells, beta)
        matched = torch.where(live, terms, torch.zeros((), dtype=dtype, device=device)).sum() / denom

    unmatched = student_merged.new_zeros(())
    if split.student_unmatched.numel() and split.teacher_unmatched.numel():
        s_u = student_merged.index_select(1, split.student_unmatched.to(device))  # (G, Us)
        t_u = torch.cat([torch.where(is_matched, neg_inf, t_lp), (t_tail + (1 - rho).log()).unsqueeze(1)], dim=1)
        l1, _ = sorted_l1(s_u, t_u, mode=mode, fast_k=fast_k)
        unmatched = l1.sum() / denom

    loss = weight * (w_m * matched + w_u * unmatched)
    tail = teacher.tail_logprob.detach().double().exp()
    return loss, {"matched": float(matched.detach()), "unmatched": float(unmatched.detach()), "matched_weight": w_m,
                  "unmatched_weight": w_u, "groups": float(groups), "matched_columns": float(split.num_matched),
                  "teacher_tail_mass": float(tail.sum() / max(groups, 1))}


__all__ = ["TopkMerged", "generalized_jsd_loss_topk", "hybrid_loss_topk", "log1mexp", "merged_topk", "tail_logprob",
           "uld_loss_topk", "vocab_split"]
