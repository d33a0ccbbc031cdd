"""Merged log-probabilities per alignment group (DESIGN §3), vectorized, in log space.

Conventions shared by the whole package:

* Token tensors are FLAT: N = all completion tokens of a batch, rows concatenated.
* ``logprobs[i]`` (a row of V log-probabilities) is the distribution that PREDICTS completion token ``token_ids[i]``
  (the causal shift is already applied: it is the model output at the position before token i).
* ``group_ids[i]`` is the global alignment-group id of token i (row offsets already added, so ids are unique across
  the batch), numbered ``0..G-1``; ``-1`` marks a token excluded from the loss (special tokens such as EOS /
  end-of-turn, an unmatched tail after an alignment mismatch). Every group id ``0..G-1`` must own at least one token
  on each side, and a group's tokens must be contiguous (alignment groups partition a completion in order).

For a group covering tokens a..b of one side:

* ``"first"`` (the seed's formula, default)::

      log P(y) = log p(y | ctx, s_<a) + sum_{i=a+1..b} log p(s_i | ctx, s_<i)

* ``"last"`` (TRL 1.16's ``uld_token_merge_strategy="bayesian"``)::

      log P(y) = log p(y | ctx, s_<b) + sum_{i=a..b-1} log p(s_i | ctx, s_<i)

Both equal the joint log-probability of the group's text at the actual tokens and are unnormalized otherwise.

TRL's default ``"observed"`` strategy slices the logits one position late (trl#5152): its "first position" row is the
distribution that predicts token a+1, not token a. ``merged_logprobs(logprobs[1:], ...)`` style shifts reproduce it;
see ``tests/test_losses_trl_parity.py::test_trl_observed_mode_is_shifted_by_one_position_trl5152``. Do not use it.

TRL multiplies probabilities and clamps each scalar factor at 1e-8; here everything stays in log space (no clamp), so
an underflowed token gives ``-inf`` merged entries (exp -> 0) with finite gradients rather than a floor.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._common import upcast

MergeStrategy = Literal["first", "last"]
MERGE_STRATEGIES: tuple[str, ...] = ("first", "last")


def _check_inputs(rows: int, token_ids: torch.Tensor, group_ids: torch.Tensor, num_groups: int, strategy: str) -> None:
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"merge strategy must be 'first' (seed formula, default) or 'last' (TRL's 'bayesian'); got "
                         f"{strategy!r}.")
    if token_ids.dim() != 1 or group_ids.dim() != 1 or token_ids.shape[0] != rows or group_ids.shape[0] != rows:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} and group_ids {tuple(group_ids.shape)} must both be 1-D "
                         f"with one entry per log-prob row ({rows}); flatten the batch (rows concatenated).")
    if num_groups < 0:
        raise ValueError(f"num_groups must be >= 0 (got {num_groups}).")
    if rows and bool((group_ids >= num_groups).any()):
        raise ValueError(f"group_ids contain ids >= num_groups={num_groups} (max {int(group_ids.max())}); pass the "
                         "global number of groups of the batch (row offsets added).")
    if rows and bool((group_ids < -1).any()):
        raise ValueError("group_ids must be >= -1 (-1 = excluded token); found smaller ids.")


def group_positions(group_ids: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last flat position of every group.

    Args:
        group_ids: (N,) int, ``-1`` = excluded.
    Returns:
        first (G,), last (G,) int64 positions into the flat token axis.
    Raises:
        ValueError naming the first group that owns no token on this side.
    """
    n = group_ids.shape[0]
    device = group_ids.device
    valid = group_ids >= 0
    positions = torch.arange(n, device=device)
    gid = group_ids.long().clamp_min(0)  # (N,) excluded tokens park on group 0 with a neutral position
    first = torch.full((num_groups,), n, dtype=torch.long, device=device)
    last = torch.full((num_groups,), -1, dtype=torch.long, device=device)
    first.scatter_reduce_(0, gid, torch.where(valid, positions, n), reduce="amin")
    last.scatter_reduce_(0, gid, torch.where(valid, positions, -1), reduce="amax")
    empty = last < 0
    if bool(empty.any()):
        g = int(empty.nonzero()[0])
        raise ValueError(f"alignment group {g} owns no token on this side ({int(empty.sum())} empty groups of "
                         f"{num_groups}); every group id 0..G-1 must cover >= 1 student and >= 1 teacher token. "
                         "Renumber groups after dropping excluded spans.")
    return first, last


def merge_scalars(token_logprobs: torch.Tensor, group_ids: torch.Tensor, num_groups: int,
                  strategy: MergeStrategy = "first") -> tuple[torch.Tensor, torch.Tensor]:
    """Base row index and summed log-prob of the actual tokens outside the base row, per group.

    Args:
        token_logprobs: (N,) log-prob of each actual token (``logprobs[i, token_ids[i]]``).
        group_ids: (N,) int, -1 = excluded.
    Returns:
        base (G,) int64 flat row whose full distribution is kept; scalar (G,) summed log-probs of the other tokens.
    """
    first, last = group_positions(group_ids, num_groups)
    base = first if strategy == "first" else last
    keep = group_ids >= 0
    keep[base] = False  # the base row's own actual token is not a scalar factor
    zero = torch.zeros((), dtype=token_logprobs.dtype, device=token_logprobs.device)
    contrib = torch.where(keep, token_logprobs, zero)
    scalar = torch.zeros(num_groups, dtype=token_logprobs.dtype, device=token_logprobs.device)
    scalar = scalar.index_add(0, group_ids.long().clamp_min(0), contrib)  # excluded rows add 0 to group 0
    return base, scalar


def merged_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, group_ids: torch.Tensor, num_groups: int,
                    strategy: MergeStrategy = "first") -> torch.Tensor:
    """Merged (unnormalized) log-probabilities of every alignment group.

    Args:
        logprobs: (N, V) log-softmax rows; row i predicts ``token_ids[i]``. Temperature, if any, already applied.
        token_ids: (N,) int actual completion tokens.
        group_ids: (N,) int global group ids, -1 = excluded (never contributes).
        num_groups: G.
        strategy: "first" (default, seed formula) or "last" (TRL "bayesian"); see the module docstring.
    Returns:
        (G, V) merged log-probabilities, differentiable w.r.t. ``logprobs``.

    Example (seed): P(x0) = [0.6, 0.3, 0.1], P(x1 | "HF") = [0.05, 0.9, 0.05], group = tokens (x0="HF", x1=1) ->
    "first" gives log [0.54, 0.27, 0.09].
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (N, V); got shape {tuple(logprobs.shape)}.")
    _check_inputs(logprobs.shape[0], token_ids, group_ids, num_groups, strategy)
    token_logprobs = logprobs.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)  # (N,)
    base, scalar = merge_scalars(token_logprobs, group_ids, num_groups, strategy)
    return logprobs[base] + scalar.unsqueeze(1)  # (G, V)


class _MergeFromLogits(torch.autograd.Function):
    """Merged log-probs straight from logits with a hand-written backward (about half the (N, V) passes of the
    autograd graph of logsumexp + gather + row selection)."""

    @staticmethod
    def forward(ctx, logits, token_ids, group_ids, base, keep, num_groups, temperature):
        n = logits.shape[0]
        if base.numel() == n and bool((base == torch.arange(n, device=base.device)).all()):
            out = logits if temperature == 1.0 else logits / temperature  # one-token groups: every row is a base
        else:
            out = logits[base]  # (G, V) row gather (advanced indexing: index_select on dim 0 is slow on CPU here)
            if temperature != 1.0:
                out /= temperature
        base_tokens = token_ids[base].unsqueeze(1)  # (G, 1)
        picked = out.gather(1, base_tokens).squeeze(1)  # (G,) base-row logit of its own token
        out = torch.log_softmax(out, dim=1)  # (G, V) one fused pass instead of logsumexp + subtract
        lse = torch.empty(n, dtype=out.dtype, device=out.device)  # (N,) log-normalizer of every row
        lse_base = picked - out.gather(1, base_tokens).squeeze(1)
        bad = ~torch.isfinite(lse_base)  # the base token's own logit is -inf: take the log-normalizer directly
        if bool(bad.any()):
            rows = logits[base[bad]] / temperature
            lse_base[bad] = torch.logsumexp(rows, dim=1)
        lse[base] = lse_base
        is_base = torch.zeros(n, dtype=torch.bool, device=out.device)
        is_base[base] = True
        others = (~is_base).nonzero().squeeze(1)  # rows of multi-token groups and excluded rows (few)
        token_logprobs = torch.zeros(n, dtype=out.dtype, device=out.device)
        if others.numel():
            rows = logits[others] / temperature  # (n_o, V)
            lse[others] = torch.logsumexp(rows, dim=1)
            token_logprobs[others] = rows.gather(1, token_ids[others].unsqueeze(1)).squeeze(1) - lse[others]
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        gid = group_ids.clamp_min(0)
        scalar = torch.zeros(num_groups, dtype=out.dtype, device=out.device).index_add_(
            0, gid, torch.where(keep, token_logprobs, zero))  # (G,)
        if others.numel():  # otherwise every group is one token and every scalar is 0
            out += scalar.unsqueeze(1)
        ctx.save_for_backward(logits, lse, token_ids, gid, base, keep)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, token_ids, gid, base, keep = ctx.saved_tensors
        temperature = ctx.temperature
        x = logits if temperature == 1.0 else logits / temperature
        gsum = grad_out.sum(1)  # (G,) gradient reaching each group's scalar
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        g_token = torch.where(keep, gsum[gid], zero)  # (N,) gradient of each scalar token log-prob
        grad_lse = -g_token
        grad_lse[base] -= gsum  # base rows: out = x[base] - lse[base] + scalar
        grad_x = (x - lse.unsqueeze(1)).exp_().mul_(grad_lse.unsqueeze(1))  # softmax * d/d lse
        if base.numel() == grad_x.shape[0] and bool((base == torch.arange(base.numel(), device=base.device)).all()):
            grad_x += grad_out
        else:
            grad_x.index_put_((base,), grad_out, accumulate=True)
        grad_x.scatter_add_(1, token_ids.unsqueeze(1), g_token.unsqueeze(1))
        if temperature != 1.0:
            grad_x /= temperature
        return grad_x, None, None, None, None, None, None


def merged_logprobs_from_logits(logits: torch.Tensor, token_ids: torch.Tensor, group_ids: torch.Tensor,
                                num_groups: int, strategy: MergeStrategy = "first",
                                temperature: float = 1.0) -> torch.Tensor:
    """``merged_logprobs(log_softmax(logits / temperature))`` without materializing the (N, V) log-softmax.

    Only the G base rows are normalized in full; the other rows contribute ``logit[token]/T - logsumexp(row/T)``.
    Backward is hand-written (softmax times the log-normalizer gradient, plus the base rows, plus the scalar tokens).

    Args:
        logits: (N, V) raw logits (half precision is computed in float32).
        token_ids, group_ids, num_groups, strategy: as ``merged_logprobs``.
        temperature: divides the logits first (TRL's ``uld_student_temperature`` / ``uld_teacher_temperature``).
    Returns:
        (G, V) merged log-probabilities.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V); got shape {tuple(logits.shape)}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive (got {temperature}).")
    _check_inputs(logits.shape[0], token_ids, group_ids, num_groups, strategy)
    logits = upcast(logits)
    first, last = group_positions(group_ids, num_groups)
    base = first if strategy == "first" else last
    keep = group_ids >= 0
    keep[base] = False
    return _MergeFromLogits.apply(logits, token_ids.long(), group_ids.long(), base, keep, num_groups,
                                  float(temperature))


def group_counts(group_ids: torch.Tensor) -> dict[str, int]:
    """Diagnostics of one side's group ids: tokens used and tokens excluded (group id -1)."""
    excluded = int((group_ids < 0).sum())
    return {"tokens": int(group_ids.shape[0]) - excluded, "excluded_tokens": excluded}
