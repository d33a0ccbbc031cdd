"""Small shared helpers of the loss package: denominators, safe KL terms, validation.

Dimension names: N flat completion tokens, G groups, V vocabulary, K top-k.
"""

from __future__ import annotations

import math

import torch

Denominator = float | int | torch.Tensor | None

#: TRL 1.16 clamps probabilities at 1e-8 before taking logs in the hybrid matched part
#: (``generalized_jsd_loss(..., logits_are_probs=True)``); ``log(1e-8)``.
TRL_LOG_FLOOR = math.log(1e-8)


def resolve_denominator(denominator: Denominator, local_count: int | torch.Tensor, *,
                        what: str) -> torch.Tensor | float:
    """The number the summed loss is divided by.

    ``denominator`` is the total count (groups or tokens) of the whole optimizer window, summed over gradient
    accumulation steps and processes; passing it makes every micro-batch contribute ``sum / window_total`` so the
    accumulated gradient equals the gradient of one big batch. ``None`` means "this call is the whole window":
    the local count, clamped to at least 1 (an empty batch gives a zero loss, not 0/0).
    """
    if denominator is None:
        if isinstance(local_count, torch.Tensor):
            return local_count.clamp_min(1)
        return float(max(int(local_count), 1))
    if isinstance(denominator, torch.Tensor):
        if bool((denominator <= 0).any()):
            raise ValueError(f"{what}: denominator must be positive (got {denominator.tolist()}); pass the number of "
                             "valid groups/tokens of the optimizer window, or None for a local mean.")
        return denominator
    if denominator <= 0:
        raise ValueError(f"{what}: denominator must be positive (got {denominator}); pass the number of valid "
                         "groups/tokens of the optimizer window, or None for a local mean.")
    return float(denominator)


def kl_terms(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p * (log p - log q)`` with the convention ``0 * log(0/q) = 0``.

    Shapes: any, broadcastable; returns the broadcast shape. Where ``p_logprobs == -inf`` the term is exactly 0 and
    its gradient is 0 (no NaN from ``0 * (-inf - -inf)``). Where ``p > 0`` but ``q == 0`` the term is +inf, which is
    the true KL; use a floor (see ``TRL_LOG_FLOOR``) if finite values are wanted.
    """
    live = p_logprobs > -math.inf
    diff = torch.where(live, p_logprobs - q_logprobs, torch.zeros((), dtype=p_logprobs.dtype, device=p_logprobs.device))
    p = torch.where(live, p_logprobs, torch.zeros((), dtype=p_logprobs.dtype, device=p_logprobs.device)).exp()
    return torch.where(live, p * diff, torch.zeros((), dtype=p_logprobs.dtype, device=p_logprobs.device))


def safe_logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) + exp(b))`` whose gradient stays finite (zero) where both inputs are -inf."""
    dead = (a == -math.inf) & (b == -math.inf)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    out = torch.logaddexp(torch.where(dead, zero, a), torch.where(dead, zero, b))
    return torch.where(dead, torch.full((), -math.inf, dtype=a.dtype, device=a.device), out)


def generalized_jsd_terms(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """Elementwise generalized JSD (not yet summed over the vocabulary).

    ``beta == 0``: ``t (log t - log s)`` summed gives KL(teacher || student) (forward KL);
    ``beta == 1``: ``s (log s - log t)`` summed gives KL(student || teacher) (reverse KL);
    otherwise ``beta * KL(t || m) + (1 - beta) * KL(s || m)`` with ``log m = logsumexp(log s + log(1-beta),
    log t + log beta)`` — the same convention as TRL 1.16's ``GOLDTrainer.generalized_jsd_loss``.
    Inputs need not be normalized (the hybrid loss feeds unnormalized merged probabilities, as TRL does).
    Shapes: (..., V) each; returns (..., V).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (got {beta}); 0 is forward KL(teacher||student), 1 is reverse KL.")
    if beta == 0.0:
        return kl_terms(teacher_logprobs, student_logprobs)
    if beta == 1.0:
        return kl_terms(student_logprobs, teacher_logprobs)
    mixture = safe_logaddexp(student_logprobs + math.log1p(-beta), teacher_logprobs + math.log(beta))
    return beta * kl_terms(teacher_logprobs, mixture) + (1.0 - beta) * kl_terms(student_logprobs, mixture)


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are computed in float32; float32/float64 stay as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def check_2d(name: str, tensor: torch.Tensor, rows: int | None = None) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, vocabulary); got shape {tuple(tensor.shape)}. Flatten the batch "
                         "to (N, V) with rows concatenated.")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"{name} has {tensor.shape[0]} rows but {rows} were expected; both merged sides must have "
                         "one row per alignment group.")
