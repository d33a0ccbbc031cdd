"""Top-k teacher forms of the losses (teacher read from the cache instead of a live forward pass; DESIGN §4).

At each teacher completion position i the cache holds K token ids ``topk_ids[i]`` with log-probabilities
``topk_logprobs[i]`` (at the training temperature) and the log-probability of the ACTUAL next teacher token
``token_logprobs[i]`` (needed by the merge; it may lie outside the top-k). The rest of the vocabulary is one tail
bucket of mass ``1 - sum(exp(topk_logprobs[i]))``.

Merging (``merged_topk``) keeps the base row's K entries and tail and adds the same scalar continuation
log-probability as ``merged_logprobs``; the merged teacher is therefore K known entries plus a tail of mass T.

Tail model (``tail_model``): the tail's values continue the cached ones as a power law in rank. With p_k the smallest
of the k cached values of a group, the value at tail rank r (k < r <= V) is ``p_k * (r / k) ** -a``, where a >= 0
is solved (bisection on a closed-form integral, then exact renormalization) so the V - k tail values carry exactly
the tail mass T. Token log-probabilities are close to Zipf-shaped, so this recovers the sorted teacher far better
than one bucket of mass T: on real SmolLM2-135M log-probs with a Gemma-3 student (``bench/teacher_cache.py``, K=64,
tail mass 4 %) the ULD error fell from 8.5 % (one bucket) to 0.4 %, the hybrid error from 10.6 % to 0.3 %.

Loss forms (T = teacher tail mass of the group, S = student mass outside the teacher's top-k ids):

* ``uld_loss_topk``: sorted L1 against ``dense_teacher`` (K values + the modelled tail, V entries). Only the tail's
  shape is modelled, its mass is exact, and sorted L1 is a metric on multisets: ``|topk - exact| <= 2 T`` per group
  still holds (reported as ``diag["topk_error_bound"]``).
* ``generalized_jsd_loss_topk`` (same tokenizer): both distributions are coarsened onto the teacher's K ids plus one
  tail cell. Coarsening never increases a divergence, so ``0 <= exact - topk``; for 0 < beta < 1 also
  ``exact - topk <= ln(2) * (beta * T + (1 - beta) * S)`` (the in-tail KLs to the mixture are at most
  ``log(M / (beta T))`` and ``log(M / ((1-beta) S))``). For beta in {0, 1} the gap is the tail mass times a KL
  inside the tail, which mass alone cannot bound.
* ``hybrid_loss_topk``: the teacher tail mass splits between matched and unmatched columns in proportion to the
  numbers of such columns outside the top-k (rho and 1 - rho).
  Matched part: exact terms on the matched top-k ids; for the matched columns outside the top-k the per-column
  teacher values are unknown, and two computable values bracket the truth: coarsening them into one cell (a lower
  bound, as above; "matched_low") and placing the modelled tail values on them in an order unrelated to the
  student's ("matched_high": the value if the teacher's tail order were independent of the student's). Real
  teacher/student pairs are positively associated, so the truth lies between; the loss uses the midpoint. Measured
  on SmolLM2 -> Gemma-3 (two prompt sets, temperatures 0.7 and 1.0) the bracket was symmetric around the exact value
  within 0.5 % at K = 64 (bracket -11 %..+11 % and -16 %..+17 %); this is an empirical estimator, not a bound, and a
  pair whose tails are strongly (anti-)associated can sit away from the midpoint (the bracket is in the diagnostics).
  Unmatched part: ULD of the student's unmatched columns against the teacher's unmatched top-k values plus the
  modelled tail at equally spaced tail ranks, scaled to mass (1 - rho) T.

With K = vocabulary size (T = 0) every form equals its exact loss. Cross-entropy needs no teacher distribution.
Teacher temperature: the cache must hold log-probabilities at the training temperature (a top-k slice cannot be
re-tempered without the tail).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ._common import TRL_LOG_FLOOR, Denominator, generalized_jsd_terms, resolve_denominator, upcast
from .hybrid import VocabSplit, drop_student_cells, hybrid_weights, jsd_on_columns, split_columns, vocab_split
from .merge import MergeStrategy, _check_inputs, merge_scalars
from .topk_numpy import placed_jsd, tail_sorted_l1
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


@dataclass
class TopkSide:
    """A cached top-k teacher as the teacher side of ``logits.chunked_merged_loss`` (in place of a ``MergeSide``).

    topk_ids, topk_logprobs: (N, K); token_logprobs: (N,); group_ids: (N,) global group ids (-1 = excluded).
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    token_logprobs: torch.Tensor
    group_ids: torch.Tensor

    def merged(self, g0: int, g1: int, strategy: MergeStrategy) -> TopkMerged:
        """``merged_topk`` of groups [g0, g1)."""
        idx = ((self.group_ids >= g0) & (self.group_ids < g1)).nonzero().squeeze(1)
        return merged_topk(self.topk_ids[idx], self.topk_logprobs[idx], self.token_logprobs[idx],
                           self.group_ids[idx] - g0, g1 - g0, strategy)


# ------------------------------------------------------------------------------------------------ tail model --
@dataclass(frozen=True)
class TailModel:
    """Power-law continuation of a merged top-k teacher below its cached entries (see module docstring).

    Per group g: ``count`` k_g valid cached entries, ``log_kth`` log of the smallest of them (log p_k), ``exponent``
    a_g >= 0; the value at tail rank r (k_g < r <= V) is ``p_k * (r / k_g) ** -a_g``. ``log_mass``: log T_g.
    All (G,) float64 (count: long).
    """

    count: torch.Tensor
    log_kth: torch.Tensor
    exponent: torch.Tensor
    log_mass: torch.Tensor
    vocab_size: int

    def log_values(self, position: torch.Tensor, step: torch.Tensor, log_mass: torch.Tensor,
                   live: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Model log-values at tail positions, rescaled so the ``live`` entries of each row sum to exp(log_mass).

        Args:
            position: (1, n) or (G, n) positions along each row's tail, in units of ``step``.
            step: (G,) or scalar fraction of the tail per position unit: the rank is k_g + position * step * (V - k_g).
            log_mass: (G,) target log-mass of the live entries. live: (G, n) bool entries that count (None = all);
                dead entries come back as -inf.
        Returns:
            (G, n) log-values in ``dtype`` (computed in ``dtype``: these are (G, V)-sized); increasing positions
            give non-increasing values.
        """
        k = self.count.clamp_min(1).double()
        factor = (torch.as_tensor(step, dtype=torch.float64, device=k.device) * (self.vocab_size - k) / k)  # (G,)
        values = (position.to(dtype) * factor.to(dtype).unsqueeze(1)).log1p_()  # (G, n) log(r / k)
        values = torch.addcmul(self.log_kth.to(dtype).unsqueeze(1), values, -self.exponent.to(dtype).unsqueeze(1))
        if live is not None:
            values.masked_fill_(~live, -math.inf)
        if values.shape[1] == 0:
            return values
        top = values.amax(dim=1, keepdim=True)  # (G, 1)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        norm = top + torch.exp(values - top).sum(1, keepdim=True).log_()  # (G, 1); -inf when no entry is live
        shift = torch.where(torch.isfinite(norm), log_mass.to(dtype).unsqueeze(1) - norm,
                            torch.full_like(norm, -math.inf))
        return values.add_(shift)


def _log_power_integral(a: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """log of the integral of x**-a over [x0, x1], 1 <= x0 < x1 (all (G,) float64)."""
    b = 1.0 - a
    span = np.log(x1) - np.log(x0)
    near = np.abs(b) < 1e-9
    safe_b = np.where(near, 1.0, b)
    with np.errstate(divide="ignore"):
        general = b * np.log(x0) + np.log(np.expm1(safe_b * span) / safe_b)
    return np.where(near, np.log(span), general)


def tail_model(teacher: TopkMerged, vocab_size: int, iterations: int = 60) -> TailModel:
    """Fit the power-law tail of each group: the exponent a_g >= 0 whose continuation of the k_g-th cached value
    over ranks k_g+1..V carries the tail mass T_g (the sum approximated by the midpoint-rule integral; callers
    renormalize exactly). a_g = 0 (a flat tail) when even a flat continuation is too light. The bisection runs in
    NumPy on (G,) vectors (no per-op thread dispatch).

    Args:
        teacher: merged top-k teacher (G, K) + tail; empty slots have id -1. vocab_size: V, the FULL teacher
            vocabulary size.
    """
    valid = teacher.ids >= 0
    count = valid.sum(1)  # (G,)
    if count.numel() and int(count.max()) > vocab_size:
        raise ValueError(f"top-k teacher has {int(count.max())} entries per group but the vocabulary size is "
                         f"{vocab_size}: pass the full teacher vocabulary size.")
    log_kth_t = teacher.logprobs.detach().double().masked_fill(~valid, math.inf).min(1).values  # (G,) smallest
    device = log_kth_t.device
    n = count.cpu().numpy()
    log_kth = np.where(n > 0, log_kth_t.cpu().numpy(), 0.0)  # nothing cached: flat tail
    log_mass = teacher.tail_logprob.detach().double().cpu().numpy()
    k = np.maximum(n, 1).astype(np.float64)
    has_tail = (n < vocab_size) & np.isfinite(log_mass) & (n > 0)
    x0 = (k + 0.5) / k
    x1 = np.where(has_tail, (vocab_size + 0.5) / k, x0 + 1.0)
    base = log_kth + np.log(k)  # log p_k + log k

    def mass(a):
        return base + _log_power_integral(a, x0, x1)

    lo, hi = np.zeros_like(k), np.full_like(k, 64.0)
    for _ in range(iterations):  # mass(a) decreases in a
        mid = (lo + hi) / 2
        heavy = mass(mid) > log_mass
        lo, hi = np.where(heavy, mid, lo), np.where(heavy, hi, mid)
    exponent = np.where(has_tail & (mass(np.zeros_like(k)) > log_mass), (lo + hi) / 2, 0.0)
    as_t = (lambda x: torch.from_numpy(x).to(device))
    return TailModel(count=count, log_kth=as_t(log_kth), exponent=as_t(exponent), log_mass=as_t(log_mass),
                     vocab_size=vocab_size)


def _merge_desc(cached: torch.Tensor, count: torch.Tensor, tail: torch.Tensor, width: int) -> torch.Tensor:
    """Merge cached values into a descending tail, without sorting the tail.

    Args:
        cached: (G, K) log-values, ``count[g]`` of them finite (any order), the rest -inf.
        tail: (G, L) log-values in descending order; row g has ``width - count[g]`` finite entries first, -inf after.
        width: W, the finite entries per row (``count[g]`` + live tail entries); L >= W - min(count).
    Returns:
        (G, W) descending: the cached values and the live tail entries of each row.
    """
    k = cached.shape[1]
    if k == 0:
        return tail[:, :width]
    ordered = cached.sort(dim=1, descending=True).values  # (G, K) finite first
    smallest = ordered.gather(1, (count - 1).clamp_min(0).unsqueeze(1))  # (G, 1) smallest cached value
    smallest = torch.where(count.unsqueeze(1) > 0, smallest, torch.full_like(smallest, math.inf))
    # tail entries above the smallest cached value (few: the tail continues below the k-th value) are merged by a
    # small sort; every later tail entry is below all cached values
    n, length = 0, tail.shape[1]
    if tail.numel():
        m = min(length, 2 * k)
        while m < length and bool((tail[:, m - 1] > smallest[:, 0]).any()):  # descending: grow the prefix
            m = min(length, 4 * m)
        n = int((tail[:, :m] > smallest).sum(1).max())
    head = torch.cat([ordered, tail[:, :n]], dim=1).sort(dim=1, descending=True).values  # (G, K + n)
    finite = count + (width - count).clamp_max(n)  # (G,) finite entries of head
    if bool((finite == k + n).all()):  # no -inf inside head (every row has K cached values): concatenate
        return torch.cat([head, tail[:, n: width - k]], dim=1) if width >= k + n else head[:, :width]
    # rows with fewer cached values: head holds (K + n - finite) -inf entries, so each such row's rest of the tail
    # moves left by that shift (one contiguous row copy each: cheaper than an index tensor of the whole block)
    out = torch.empty(tail.shape[0], width, dtype=tail.dtype, device=tail.device)
    lead = min(k + n, width)
    p = torch.arange(lead, device=tail.device).unsqueeze(0)  # (1, lead)
    shift = k + n - finite  # (G,)
    head_ext = torch.cat([head, tail[:, n: n + k]], dim=1)  # (G, 2K + n): enough tail after head for any shift
    out[:, :lead] = head_ext.gather(1, torch.where(p < finite.unsqueeze(1), p, p + shift.unsqueeze(1)))
    if width > lead:
        for g, d in enumerate(shift.tolist()):  # bulk region: out[g, p] = tail[g, p - k + d] for p >= k + n
            out[g, lead:] = tail[g, lead - k + d: width - k + d]
    return out


def dense_teacher(teacher: TopkMerged, vocab_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(G, V) merged teacher log-values: the cached entries plus the power-law tail at ranks k_g+1..V, sorted in
    descending order (not in vocabulary order: for ULD only the multiset matters)."""
    model = tail_model(teacher, vocab_size)
    cached = teacher.logprobs.to(dtype).masked_fill(teacher.ids < 0, -math.inf)
    return _merge_desc(cached, model.count,
                       _tail_block(model, vocab_size - model.count, model.log_mass, dtype, vocab_size), vocab_size)


def _tail_block(model: TailModel, slots: torch.Tensor, log_mass: torch.Tensor, dtype: torch.dtype,
                grid: int) -> torch.Tensor:
    """(G, max slots) descending modelled tail on a grid of ``grid`` positions: value i sits at tail position
    (i + 1/2) / grid, row g has the first ``slots[g]`` of them (<= grid) carrying ``log_mass[g]``, then -inf.

    ``grid`` is the block's width (the columns the tail may occupy), not a property of the batch, so a group's values
    do not depend on the other groups of its batch. A row with fewer slots (some of its cached entries sit in the
    block) stops short of the last grid - slots[g] positions: at most K of ~10^5, where the values are smallest."""
    width = int(slots.max()) if slots.numel() else 0
    if width > grid:
        raise ValueError(f"tail slots ({width}) exceed the grid ({grid}).")
    position = torch.arange(width, dtype=dtype, device=slots.device).add_(0.5).unsqueeze(0)  # (1, width): i + 1/2
    step = torch.tensor(1.0 / max(grid, 1), dtype=torch.float64)  # tail position (i + 1/2) / grid
    if slots.numel() and bool((slots == width).all()):  # same count in every row: no dead entries
        return model.log_values(position, step, log_mass, None, dtype)
    live = torch.arange(width, device=slots.device).unsqueeze(0) < slots.unsqueeze(1)
    return model.log_values(position, step, log_mass, live, dtype)


def uld_loss_topk(student_merged: torch.Tensor, teacher: TopkMerged, teacher_vocab_size: int, *,
                  denominator: Denominator = None, mode: UldMode = "exact", fast_k: int = DEFAULT_FAST_K,
                  weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """ULD with a merged top-k teacher whose tail is the power-law continuation (``dense_teacher``).

    Args:
        student_merged: (G, Vs) merged student log-probabilities.
        teacher: ``merged_topk`` output (G, K) + tail. teacher_vocab_size: Vt, the full teacher vocabulary.
    Returns:
        loss scalar (``weight * sum_g uld_g / denominator``); diag: "uld", "groups", "teacher_tail_mass" (mean per
        group), "topk_error_bound" (``weight * 2 * sum_g T_g / denominator``, bounds |loss - exact loss|).
    """
    if _numpy_kernels(student_merged, mode):
        model = tail_model(teacher, teacher_vocab_size)
        cached = teacher.logprobs.to(student_merged.dtype).masked_fill(teacher.ids < 0, -math.inf)
        l1 = tail_sorted_l1(student_merged, cached, model.count, teacher_vocab_size - model.count, model.exponent,
                            model.log_mass, model.count.clamp_min(1), teacher_vocab_size, teacher_vocab_size)
    else:
        dense = dense_teacher(teacher, teacher_vocab_size, student_merged.dtype)  # (G, Vt)
        l1, _ = sorted_l1(student_merged, dense, mode=mode, fast_k=fast_k, teacher_sorted=True)
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


def _numpy_kernels(student_merged: torch.Tensor, mode: UldMode) -> bool:
    """The NumPy kernels of ``topk_numpy`` serve CPU float32 in exact mode; everything else takes the torch path."""
    return student_merged.device.type == "cpu" and student_merged.dtype == torch.float32 and mode == "exact"


@functools.lru_cache(maxsize=8)
def _placement(columns: int) -> torch.Tensor:
    """(columns,) float64 in (0, 1): a fixed equidistributed sequence (golden-ratio Weyl sequence) that places the
    tail model's quantiles on the matched columns with no relation to their order in the vocabulary."""
    return torch.remainder((torch.arange(columns, dtype=torch.float64) + 1) * 0.6180339887498949, 1.0)


def hybrid_loss_topk(student_merged: torch.Tensor, teacher: TopkMerged, vocab_map, *, beta: float = 0.5,
                     matched_weight: float | None = None, unmatched_weight: float | None = None,
                     denominator: Denominator = None, mode: UldMode = "exact", fast_k: int = DEFAULT_FAST_K,
                     log_floor: float | None = TRL_LOG_FLOOR, weight: float = 1.0,
                     student_dropped: tuple[torch.Tensor, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """Hybrid loss with a merged top-k teacher (see module docstring); same weights/floor as ``hybrid_loss``.

    Args:
        student_merged: (G, Vs); teacher: TopkMerged (G, K) + tail; vocab_map: (M, 2) or a ``VocabSplit`` whose
            teacher vocabulary size Vt is the FULL teacher vocabulary (the default weight is M / Vt).
        student_dropped: as ``hybrid_loss`` (cells left out of the student's ULD side).
    Returns:
        loss scalar; diag like ``hybrid_loss`` plus "teacher_tail_mass" and the matched part's bracket
        "matched_low" (tail cell coarsened: a lower bound) / "matched_high" (tail placed with no association);
        the returned matched part is their mean.
    """
    if not isinstance(vocab_map, VocabSplit):
        raise ValueError("hybrid_loss_topk needs a VocabSplit (vocab_split(vocab_map, Vs, Vt)): the full teacher "
                         "vocabulary size Vt cannot be read from a top-k slice.")
    split = vocab_map
    device, dtype = student_merged.device, student_merged.dtype
    w_m, w_u = hybrid_weights(split, matched_weight, unmatched_weight)
    groups = teacher.ids.shape[0]
    denom = resolve_denominator(denominator, groups, what="hybrid_loss_topk")
    model = tail_model(teacher, split.teacher_vocab_size)
    vt, m_cols = split.teacher_vocab_size, split.num_matched

    numpy_path = _numpy_kernels(student_merged, mode)
    placed_kernel = numpy_path and log_floor is not None and log_floor > -80.0  # it floors: exp(floor) > 0
    ids = teacher.ids.long()  # (G, K); -1 marks an empty slot (fewer than K alternatives cached)
    valid = ids >= 0
    s_col = torch.where(valid, split.teacher_to_student(device)[ids.clamp_min(0)], -1)  # (G, K) -1: unmatched
    is_matched = s_col >= 0
    neg_inf = torch.full((), -math.inf, dtype=dtype, device=device)
    t_lp = teacher.logprobs.to(dtype).masked_fill(~valid, -math.inf)
    # share of the teacher tail on matched columns (matched columns outside the top-k / all columns outside it)
    outside = (vt - model.count).clamp_min(1).double()  # (G,)
    matched_outside = (m_cols - is_matched.sum(1)).clamp_min(0)  # (G,)
    rho = (matched_outside.double() / outside).clamp(0, 1)
    log_t_matched = model.log_mass + rho.log()  # (G,) float64 teacher tail mass on matched columns
    log_t_unmatched = model.log_mass + (1 - rho).log()

    s_matched, s_unmatched = split_columns(student_merged, split.student_matched, split.student_unmatched,
                                           split.student_ids_unique)  # (G, M), (G, Us)
    s_unmatched = drop_student_cells(s_unmatched, split, student_dropped)
    matched = low = high = student_merged.new_zeros(())
    if m_cols:
        s_all = s_matched  # (G, M)
        m_index = split.teacher_to_matched(device)
        cols = torch.where(is_matched, m_index[ids.clamp_min(0)], m_cols)  # (G, K); m_cols = a spare column
        if placed_kernel:  # placed bracket, the student's matched mass and its top-k values in one NumPy pass
            placed_all, s_mass, s_k = placed_jsd(s_all, torch.where(is_matched, cols, -1), model.exponent,
                                                 log_t_matched, model.count.clamp_min(1), _placement(m_cols), vt,
                                                 beta=beta, log_floor=log_floor)
        else:
            s_k = student_merged.gather(1, s_col.clamp_min(0))  # (G, K)
            s_mass = torch.logsumexp(s_all, dim=1).exp()
        # top-k matched columns: exact terms
        live_k = torch.cat([is_matched, torch.ones_like(is_matched[:, :1])], dim=1)  # (G, K + 1)
        # tail, lower bracket: one coarsened cell (student / teacher mass on matched columns outside the top-k)
        inside = torch.where(is_matched, s_k, neg_inf).exp().sum(1)  # (G,)
        s_rest = s_mass - inside
        positive = s_rest > 0
        s_rest_log = torch.where(positive, torch.where(positive, s_rest, torch.ones_like(s_rest)).log(), neg_inf)
        s_cells = torch.cat([torch.where(is_matched, s_k, neg_inf), s_rest_log.unsqueeze(1)], dim=1)
        t_cells = torch.cat([torch.where(is_matched, t_lp, neg_inf), log_t_matched.to(dtype).unsqueeze(1)], dim=1)
        if log_floor is not None:
            s_cells, t_cells = s_cells.clamp_min(log_floor), t_cells.clamp_min(log_floor)
        terms = torch.where(live_k, generalized_jsd_terms(s_cells, t_cells, beta), torch.zeros((), dtype=dtype,
                                                                                                    device=device))
        top_part = terms[:, :-1].sum()
        coarse = terms[:, -1].sum()
        # tail, upper bracket: the power-law tail values placed on the matched columns by a fixed sequence
        if placed_kernel:
            t_at_k = torch.full_like(s_k, -math.inf)  # the placed teacher is -inf on the top-k columns
        else:
            in_top = torch.zeros(groups, m_cols + 1, dtype=torch.bool, device=device)
            in_top = in_top.scatter_(1, cols, True)[:, :m_cols]  # (G, M) matched columns in the top-k
            fracs = _placement(m_cols).to(device=device, dtype=dtype).unsqueeze(0)  # (1, M) positions in (0, 1)
            t_placed = model.log_values(fracs, torch.ones(()), log_t_matched, ~in_top, dtype)  # (G, M)
            placed_all = jsd_on_columns(s_all, t_placed, beta=beta, log_floor=log_floor)  # (G,) all M columns
            t_at_k = t_placed.gather(1, cols.clamp_max(m_cols - 1))  # (G, K)
        # remove the top-k columns' terms from that sum (their teacher value is -inf there, floored if a floor is set)
        s_f, t_f = (s_k, t_at_k) if log_floor is None else (s_k.clamp_min(log_floor), t_at_k.clamp_min(log_floor))
        at_k = torch.where(is_matched, generalized_jsd_terms(s_f, t_f, beta), torch.zeros((), dtype=dtype,
                                                                                          device=device)).sum()
        placed = placed_all.sum() - at_k
        matched = (top_part + (coarse + placed) / 2) / denom
        low, high = (top_part + coarse) / denom, (top_part + placed) / denom

    unmatched = student_merged.new_zeros(())
    if split.student_unmatched.numel() and split.teacher_unmatched.numel():
        s_u = s_unmatched  # (G, Us)
        width = split.teacher_unmatched.numel()
        cached_u = torch.where(is_matched, neg_inf, t_lp)  # (G, K) cached unmatched entries
        count_u = (valid & ~is_matched).sum(1)
        slots = (width - count_u).clamp_min(0)  # unmatched columns outside the top-k
        if numpy_path:
            l1 = tail_sorted_l1(s_u, cached_u, count_u, slots, model.exponent, log_t_unmatched,
                                model.count.clamp_min(1), vt, width)
        else:
            tail_u = _tail_block(model, slots, log_t_unmatched, dtype, width)  # (G, max slots)
            t_u = _merge_desc(cached_u, count_u, tail_u, width)  # (G, Ut) descending
            l1, _ = sorted_l1(s_u, t_u, mode=mode, fast_k=fast_k, teacher_sorted=True)
        unmatched = l1.sum() / denom

    loss = weight * (w_m * matched + w_u * unmatched)
    tail = teacher.tail_logprob.detach().double().exp()
    return loss, {"matched": float(matched.detach()), "unmatched": float(unmatched.detach()), "matched_weight": w_m,
                  "unmatched_weight": w_u, "groups": float(groups), "matched_columns": float(split.num_matched),
                  "matched_low": float(low.detach()), "matched_high": float(high.detach()),
                  "teacher_tail_mass": float(tail.sum() / max(groups, 1))}


__all__ = ["TailModel", "TopkMerged", "TopkSide", "dense_teacher", "generalized_jsd_loss_topk", "hybrid_loss_topk",
           "log1mexp", "merged_topk", "tail_logprob", "tail_model", "uld_loss_topk", "vocab_split"]
