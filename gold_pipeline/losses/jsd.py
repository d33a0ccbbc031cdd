"""Generalized Jensen-Shannon divergence for same-tokenizer pairs (DESIGN §4).

Per token i (a row of V logits on each side, temperatures dividing the logits first)::

    beta == 0 : KL(t || s)                         (forward KL)
    beta == 1 : KL(s || t)                         (reverse KL)
    otherwise : beta * KL(t || m) + (1 - beta) * KL(s || m),   log m = logsumexp(log s + log(1-beta), log t + log beta)

loss = weight * sum_{i: mask_i} jsd_i / denominator. Matches TRL 1.16 ``GOLDTrainer.generalized_jsd_loss`` (which uses
one temperature for both sides and ``num_items_in_batch`` as the denominator).
"""

from __future__ import annotations

import torch

from ._common import Denominator, check_2d, generalized_jsd_terms, resolve_denominator, upcast


def _mask_rows(rows: int, mask: torch.Tensor | None, device) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dim() != 1 or mask.shape[0] != rows:
        raise ValueError(f"mask must be 1-D with one entry per token row ({rows}); got shape {tuple(mask.shape)}.")
    return mask.to(device=device, dtype=torch.bool)


def generalized_jsd_per_token(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                              beta: float) -> torch.Tensor:
    """(N, V), (N, V) log-probabilities -> (N,) generalized JSD per row (sum over the vocabulary)."""
    return generalized_jsd_terms(student_logprobs, teacher_logprobs, beta).sum(dim=-1)


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5,
                         temperature: float = 1.0, teacher_temperature: float | None = None,
                         mask: torch.Tensor | None = None, denominator: Denominator = None, weight: float = 1.0,
                         inputs_are_logprobs: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Generalized JSD between student and teacher token distributions (same vocabulary).

    Args:
        student_logits: (N, V) student logits; row i predicts completion token i.
        teacher_logits: (N, V) teacher logits for the same tokens (no gradient needed).
        beta: 0 forward KL(teacher||student), 1 reverse KL(student||teacher), else the beta-mixture JSD.
        temperature: divides the student logits (and the teacher's unless ``teacher_temperature`` is given).
        mask: (N,) bool, True = token counts (e.g. ``group_ids >= 0``); None = all rows.
        denominator: total valid tokens of the optimizer window; None = local count of valid rows.
        weight: multiplies the loss.
        inputs_are_logprobs: the inputs are already log-probabilities (temperature then must be 1).
    Returns:
        loss scalar; diag {"jsd": loss before weight, "tokens": valid rows}.
    """
    check_2d("student_logits", student_logits)
    check_2d("teacher_logits", teacher_logits, rows=student_logits.shape[0])
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(f"generalized_jsd_loss needs one shared vocabulary; got student V={student_logits.shape[1]} "
                         f"and teacher V={teacher_logits.shape[1]}. Use hybrid_loss or uld_loss across tokenizers.")
    t_temp = temperature if teacher_temperature is None else teacher_temperature
    if temperature <= 0 or t_temp <= 0:
        raise ValueError(f"temperatures must be positive (got {temperature}, {t_temp}).")
    keep = _mask_rows(student_logits.shape[0], mask, student_logits.device)
    if keep is not None:
        idx = keep.nonzero().squeeze(1)
        student_logits, teacher_logits = student_logits[idx], teacher_logits[idx]
    if inputs_are_logprobs:
        if temperature != 1.0 or t_temp != 1.0:
            raise ValueError("inputs_are_logprobs=True takes log-probabilities already at the training temperature; "
                             "pass temperature=1.0.")
        s_lp, t_lp = student_logits, teacher_logits
    else:
        s_lp = torch.log_softmax(upcast(student_logits) / temperature, dim=-1)  # (n, V)
        t_lp = torch.log_softmax(upcast(teacher_logits) / t_temp, dim=-1)
    per_token = generalized_jsd_per_token(s_lp, t_lp, beta)  # (n,)
    tokens = per_token.shape[0]
    loss = per_token.sum() / resolve_denominator(denominator, tokens, what="generalized_jsd_loss")
    return weight * loss, {"jsd": float(loss.detach()), "tokens": float(tokens)}
