"""Hybrid ULD loss: generalized JSD on the matched vocabulary, ULD on the rest (DESIGN §4, TRL 1.16 parity).

The vocab map (M, 2) pairs ``[student_id, teacher_id]`` whose tokens have identical bytes. Per group g with merged
(unnormalized) probabilities p_s, p_t:

* matched part (M columns, in map order, NOT renormalized — TRL 1.16 feeds the raw merged probabilities of the
  matched columns to ``generalized_jsd_loss(..., logits_are_probs=True)``, which takes ``log(p.clamp_min(1e-8))``)::

      matched_g = sum_j jsd_terms(max(log p_s[s_j], floor), max(log p_t[t_j], floor); beta)

  with ``floor = log(1e-8)`` by default (``log_floor=None`` disables it; the floor also keeps the loss finite when
  merged probabilities underflow);
* unmatched part: ULD (sorted L1, zero padding) between the student's unmatched columns and the teacher's unmatched
  columns. As in TRL it is 0 when either side has no unmatched column.

loss = weight * (w_m * sum_g matched_g + w_u * sum_g unmatched_g) / denominator, with fixed weights or, when both are
None, TRL's default ``w_m = M / Vt`` (M = matched pairs, Vt = teacher vocabulary size) and ``w_u = 1 - w_m``.

Identical tokenizers with one-token groups make ``matched_g`` the plain per-token generalized JSD (up to the floor).
``uld_skip_student_eos`` / ``uld_skip_teacher_eos``: see ``gold_pipeline.losses.uld`` (EOS tokens carry group id -1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._common import TRL_LOG_FLOOR, Denominator, check_2d, generalized_jsd_terms, resolve_denominator
from .uld import DEFAULT_FAST_K, DEFAULT_FAST_TOL, UldMode, _run_chunks, sorted_l1


@dataclass(frozen=True)
class VocabSplit:
    """Column index tensors of a vocab map, computed once per (student, teacher) pair.

    student_matched (M,), teacher_matched (M,): paired columns; student_unmatched (Us,), teacher_unmatched (Ut,):
    every column that appears in no pair. ``student_vocab_size``/``teacher_vocab_size``: Vs, Vt.
    """

    student_matched: torch.Tensor
    teacher_matched: torch.Tensor
    student_unmatched: torch.Tensor
    teacher_unmatched: torch.Tensor
    student_vocab_size: int
    teacher_vocab_size: int
    student_ids_unique: bool = False  # every student id appears at most once in the map (columns partition Vs)

    @property
    def num_matched(self) -> int:
        return int(self.student_matched.shape[0])

    def teacher_to_student(self, device) -> torch.Tensor:
        """(Vt,) student column of each teacher id, -1 where unmatched (built once per device)."""
        return self._teacher_index("to_student", device, self.student_matched)

    def teacher_to_matched(self, device) -> torch.Tensor:
        """(Vt,) position of each teacher id in the matched list, -1 where unmatched (built once per device)."""
        return self._teacher_index("to_matched", device, torch.arange(self.num_matched))

    def student_to_unmatched(self, device) -> torch.Tensor:
        """(Vs,) position of each student id in ``student_unmatched``, -1 where matched (built once per device)."""
        return self._index("student_to_unmatched", device, self.student_vocab_size, self.student_unmatched,
                           torch.arange(self.student_unmatched.numel()))

    def _teacher_index(self, name: str, device, values: torch.Tensor) -> torch.Tensor:
        return self._index(name, device, self.teacher_vocab_size, self.teacher_matched, values)

    def _index(self, name: str, device, size: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        cache = self.__dict__.setdefault("_index_cache", {})  # frozen dataclass: a plain cache dict on the instance
        key = (name, str(torch.device(device)))
        if key not in cache:
            index = torch.full((size,), -1, dtype=torch.long, device=device)
            index[keys.to(device)] = values.to(device)
            cache[key] = index
        return cache[key]

    def to(self, device) -> "VocabSplit":
        return VocabSplit(self.student_matched.to(device), self.teacher_matched.to(device),
                          self.student_unmatched.to(device), self.teacher_unmatched.to(device),
                          self.student_vocab_size, self.teacher_vocab_size, self.student_ids_unique)


def vocab_split(vocab_map, student_vocab_size: int, teacher_vocab_size: int) -> VocabSplit:
    """Build a ``VocabSplit`` from a (M, 2) ``[student_id, teacher_id]`` map (numpy array or tensor)."""
    pairs = torch.as_tensor(vocab_map, dtype=torch.long)
    if pairs.numel() == 0:
        pairs = pairs.reshape(0, 2)
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"vocab_map must be (M, 2) [student_id, teacher_id]; got shape {tuple(pairs.shape)}.")
    s_ids, t_ids = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    for name, ids, size in (("student", s_ids, student_vocab_size), ("teacher", t_ids, teacher_vocab_size)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
            raise ValueError(f"vocab_map {name} ids must lie in [0, {size}) (the {name} vocabulary / logit width); "
                             f"got range [{int(ids.min())}, {int(ids.max())}]. Rebuild the map for these tokenizers.")
    s_seen = torch.zeros(student_vocab_size, dtype=torch.bool)
    t_seen = torch.zeros(teacher_vocab_size, dtype=torch.bool)
    s_seen[s_ids] = True
    t_seen[t_ids] = True
    return VocabSplit(s_ids, t_ids, (~s_seen).nonzero().squeeze(1), (~t_seen).nonzero().squeeze(1),
                      student_vocab_size, teacher_vocab_size, int(s_seen.sum()) == int(s_ids.numel()))


class _ColumnSplit(torch.autograd.Function):
    """(G, V) -> its columns ``first`` (G, A) and ``second`` (G, B), where first and second partition 0..V-1.

    Backward writes both gradients into one (G, V) buffer by scatter (no zero-filled buffers per part, no sum)."""

    @staticmethod
    def forward(ctx, merged, first, second):
        ctx.save_for_backward(first, second)
        ctx.shape = merged.shape
        return merged.index_select(1, first), merged.index_select(1, second)

    @staticmethod
    def backward(ctx, grad_first, grad_second):
        first, second = ctx.saved_tensors
        rows, width = ctx.shape
        grad = torch.empty(rows, width, dtype=(grad_first if grad_first is not None else grad_second).dtype,
                           device=first.device)
        for idx, part in ((first, grad_first), (second, grad_second)):
            if part is None:
                part = grad.new_zeros(rows, idx.shape[0])
            grad.scatter_(1, idx.unsqueeze(0).expand(rows, -1), part)
        return grad, None, None


def split_columns(merged: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                  partition: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, V) -> (G, A), (G, B) column gathers; one shared backward buffer when the two index sets partition V."""
    first, second = first.to(merged.device), second.to(merged.device)
    if partition and merged.requires_grad and first.numel() and second.numel():
        return _ColumnSplit.apply(merged, first, second)
    return merged.index_select(1, first), merged.index_select(1, second)


def drop_student_cells(s_unmatched: torch.Tensor, split: VocabSplit,
                       cells: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The student's unmatched columns (G, Us) with ``cells`` = (rows (L,), student ids (L,)) set to probability 0
    (-inf), out of place: they leave the sorted L1 (zero entries do not change it) and get no gradient.

    The projection loss's live cells, removed from the small (G, Us) gather instead of a (G, Vs) copy."""
    if cells is None or cells[0].numel() == 0:
        return s_unmatched
    rows, ids = (c.to(s_unmatched.device) for c in cells)
    at = split.student_to_unmatched(s_unmatched.device)[ids]  # (L,)
    if bool((at < 0).any()):
        raise ValueError("drop_student_cells: a cell names a matched student column; the projection table and the "
                         "vocab split must come from the same tokenizer pair.")
    return s_unmatched.index_put((rows, at), s_unmatched.new_full((), -math.inf))


def hybrid_weights(split: VocabSplit, matched_weight: float | None,
                   unmatched_weight: float | None) -> tuple[float, float]:
    """Fixed weights, or TRL's default ``(M / Vt, 1 - M / Vt)`` when both are None."""
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError("matched_weight and unmatched_weight must both be None (default M/Vt and 1-M/Vt) or both "
                         f"numbers; got {matched_weight} and {unmatched_weight}.")
    if matched_weight is None:
        w = split.num_matched / max(1, split.teacher_vocab_size)
        return w, 1.0 - w
    return float(matched_weight), float(unmatched_weight)


def floored_jsd_rows(s: np.ndarray, t: np.ndarray, p_s: np.ndarray | None, p_t: np.ndarray | None,
                     beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalized-JSD row sums of floored log-values and their gradient w.r.t. s (NumPy, float32 rows).

    Args:
        s, t: (c, M) floored student / teacher log-values (overwritten). p_s, p_t: exp of them (overwritten; p_s may
            be None when beta == 0, p_t when beta == 1).
    Returns:
        (c,) float64 sums, (c, M) d sums / d s (the caller zeroes it where the floor clamped the student).
    """
    if beta == 0.0:
        diff = np.subtract(t, s, out=t)
        return np.einsum("ij,ij->i", p_t, diff), np.negative(p_t, out=p_t)
    if beta == 1.0:
        diff = np.subtract(s, t, out=t)
        sums = np.einsum("ij,ij->i", p_s, diff)
        return sums, np.multiply(np.add(diff, 1.0, out=diff), p_s, out=p_s)
    # floored inputs: the mixture is >= min(beta, 1-beta) * 1e-8 > 0, so log of the sum is safe (and much faster
    # than logaddexp)
    mix = np.multiply(p_t, beta)
    mix += (1.0 - beta) * p_s
    np.log(mix, out=mix)
    np.subtract(s, mix, out=s)
    np.subtract(t, mix, out=t)
    sums = beta * np.einsum("ij,ij->i", p_t, t) + (1.0 - beta) * np.einsum("ij,ij->i", p_s, s)
    return sums, np.multiply(np.multiply(s, p_s, out=s), 1.0 - beta, out=s)


class _FlooredJSD(torch.autograd.Function):
    """Row sums of floored generalized-JSD terms with a closed-form gradient w.r.t. the student log-probs.

    Forward works chunk by chunk without autograd and keeps only d(sum)/d(log s) (one (G, M) tensor), instead of
    the ~10 intermediates autograd would save. Gradients (per element, s/t the floored probabilities, m the mixture):
    beta = 0: -t;  beta = 1: s (log s - log t + 1);  else (1 - beta) s (log s - log m); zero where the floor clamps.
    """

    @staticmethod
    def forward(ctx, student_logprobs, teacher_logprobs, beta, log_floor):
        if (student_logprobs.device.type == "cpu" and student_logprobs.dtype == torch.float32
                and teacher_logprobs.dtype == torch.float32):
            return _FlooredJSD._forward_numpy(ctx, student_logprobs, teacher_logprobs, beta, log_floor)
        rows, width = student_logprobs.shape
        step = max(1, (1 << 21) // max(width, 1))
        sums = torch.empty(rows, dtype=torch.float64, device=student_logprobs.device)
        grad = torch.empty_like(student_logprobs) if ctx.needs_input_grad[0] else None
        for a in range(0, rows, step):
            b = min(a + step, rows)
            s_raw = student_logprobs[a:b]
            s = s_raw.clamp_min(log_floor)
            t = teacher_logprobs[a:b].clamp_min(log_floor)
            if beta == 0.0:
                p_t = t.exp()
                sums[a:b] = (p_t * (t - s)).sum(1).double()
                g = p_t.neg_()
            elif beta == 1.0:
                diff = s - t
                p_s = s.exp()
                sums[a:b] = (p_s * diff).sum(1).double()
                g = diff.add_(1.0).mul_(p_s)
            else:
                p_t = t.exp()
                p_s = s.exp()
                mix = (p_t * beta).add_(p_s, alpha=1.0 - beta).log_()  # floored: mixture > 0
                d_t = t.sub_(mix)
                d_s = s.sub_(mix)
                sums[a:b] = (beta * (p_t * d_t).sum(1).double()
                             + (1.0 - beta) * (p_s * d_s).sum(1).double())
                g = d_s.mul_(p_s).mul_(1.0 - beta)
            if grad is not None:
                grad[a:b] = g.masked_fill_(s_raw < log_floor, 0.0)
        ctx.save_for_backward(grad)
        return sums.to(student_logprobs.dtype)

    @staticmethod
    def _forward_numpy(ctx, student_logprobs, teacher_logprobs, beta, log_floor):
        """Same math in NumPy ufuncs with preallocated buffers, row chunks on ``torch.get_num_threads()`` threads."""
        need = ctx.needs_input_grad[0]
        s_all = student_logprobs.detach().contiguous().numpy()
        t_all = teacher_logprobs.detach().contiguous().numpy()
        rows, width = s_all.shape
        sums = np.empty(rows, dtype=np.float64)
        grad = np.empty_like(s_all) if need else None

        def one(span):
            a, b = span
            ls, lt = s_all[a:b], t_all[a:b]
            s = np.maximum(ls, log_floor)
            t = np.maximum(lt, log_floor)
            p_s = None if beta == 0.0 else np.exp(s)
            p_t = None if beta == 1.0 else np.exp(t)
            sums[a:b], g = floored_jsd_rows(s, t, p_s, p_t, beta)
            if need:
                np.multiply(g, ls >= log_floor, out=g)  # no gradient where the floor clamps
                grad[a:b] = g
            return None

        step = max(1, (1 << 20) // max(width, 1))
        _run_chunks(one, [(i, min(i + step, rows)) for i in range(0, rows, step)])
        ctx.save_for_backward(None if grad is None else torch.from_numpy(grad))
        return torch.from_numpy(sums).to(student_logprobs.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.unsqueeze(1), None, None, None


def matched_jsd_per_group(student_merged: torch.Tensor, teacher_merged: torch.Tensor, split: VocabSplit, *,
                          beta: float, log_floor: float | None = TRL_LOG_FLOOR) -> torch.Tensor:
    """(G, Vs), (G, Vt) merged log-probs -> (G,) generalized JSD summed over the M matched columns."""
    s_m = student_merged.index_select(1, split.student_matched.to(student_merged.device))  # (G, M)
    t_m = teacher_merged.index_select(1, split.teacher_matched.to(teacher_merged.device))  # (G, M)
    return jsd_on_columns(s_m, t_m, beta=beta, log_floor=log_floor)


def jsd_on_columns(s_m: torch.Tensor, t_m: torch.Tensor, *, beta: float,
                   log_floor: float | None = TRL_LOG_FLOOR) -> torch.Tensor:
    """(G, M) student and teacher log-values of paired columns -> (G,) floored generalized-JSD row sums."""
    t_m = t_m.to(s_m.dtype)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (got {beta}); 0 is forward KL(teacher||student), 1 is reverse KL.")
    if log_floor is not None and log_floor > -80.0 and not t_m.requires_grad:  # exp(floor) must not underflow
        return _FlooredJSD.apply(s_m, t_m, float(beta), float(log_floor))
    if log_floor is not None:
        s_m, t_m = s_m.clamp_min(log_floor), t_m.clamp_min(log_floor)
    return generalized_jsd_terms(s_m, t_m, beta).sum(dim=1)


def hybrid_loss(student_merged: torch.Tensor, teacher_merged: torch.Tensor, vocab_map, *, beta: float = 0.5,
                matched_weight: float | None = None, unmatched_weight: float | None = None,
                denominator: Denominator = None, mode: UldMode = "exact", fast_k: int = DEFAULT_FAST_K,
                fast_tol: float | None = DEFAULT_FAST_TOL, log_floor: float | None = TRL_LOG_FLOOR,
                weight: float = 1.0, group_mask: torch.Tensor | None = None,
                teacher_matched_shift: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                student_dropped: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Hybrid ULD loss (see module docstring).

    Args:
        student_merged: (G, Vs) merged student log-probabilities (``merged_logprobs``), temperature applied.
        teacher_merged: (G, Vt) merged teacher log-probabilities.
        vocab_map: (M, 2) int ``[student_id, teacher_id]`` pairs, or a precomputed ``VocabSplit``.
        beta: generalized-JSD beta of the matched part (0 forward KL, 1 reverse KL).
        matched_weight, unmatched_weight: both None (TRL default M/Vt, 1-M/Vt) or both numbers.
        denominator: total valid groups of the optimizer window; None = local number of groups.
        mode, fast_k, fast_tol: ULD mode of the unmatched part ("exact" default, or "fast"; see uld.py).
        log_floor: lower clamp of the matched log-probabilities (TRL: log 1e-8); None = no clamp.
        weight: multiplies the loss (``uld_distillation_weight``).
        group_mask: optional (G,) bool; False drops a group.
        teacher_matched_shift: optional (rows (c,), matched positions (c,), deltas (c,)): added to the teacher's
            matched log-values at those cells before the matched part (the projection loss's exclusive prefixes;
            no (G, Vt) copy is made).
        student_dropped: optional (rows (L,), unmatched student ids (L,)): cells left out of the student's ULD side
            (``drop_student_cells``; the projection loss's live pairs).
    Returns:
        loss scalar; diag floats: "matched" and "unmatched" (each sum/denominator, before weights), "matched_weight",
        "unmatched_weight", "groups", "matched_columns", and in fast mode "fast_error_bound" (on the returned loss).
    """
    check_2d("student_merged", student_merged)
    check_2d("teacher_merged", teacher_merged, rows=student_merged.shape[0])
    split = vocab_map if isinstance(vocab_map, VocabSplit) else vocab_split(
        vocab_map, student_merged.shape[1], teacher_merged.shape[1])
    if (split.student_vocab_size, split.teacher_vocab_size) != (student_merged.shape[1], teacher_merged.shape[1]):
        raise ValueError(f"VocabSplit was built for (Vs, Vt)=({split.student_vocab_size}, {split.teacher_vocab_size}) "
                         f"but the merged tensors have ({student_merged.shape[1]}, {teacher_merged.shape[1]}).")
    w_m, w_u = hybrid_weights(split, matched_weight, unmatched_weight)
    groups = student_merged.shape[0]
    keep = None if group_mask is None else group_mask.to(device=student_merged.device, dtype=student_merged.dtype)
    if keep is not None:
        groups = int(group_mask.sum())
    denom = resolve_denominator(denominator, groups, what="hybrid_loss")

    s_m, s_u = split_columns(student_merged, split.student_matched, split.student_unmatched,
                             split.student_ids_unique)  # (G, M), (G, Us)
    s_u = drop_student_cells(s_u, split, student_dropped)
    t_m, t_u = split_columns(teacher_merged, split.teacher_matched, split.teacher_unmatched, False)  # (G, M), (G, Ut)
    if teacher_matched_shift is not None:  # t_m is a fresh gather: edit it in place
        rows, cols, deltas = teacher_matched_shift
        t_m = t_m.detach()
        t_m.index_put_((rows.to(t_m.device), cols.to(t_m.device)), deltas.to(t_m), accumulate=True)

    matched = student_merged.new_zeros(())
    if split.num_matched:
        per_group = jsd_on_columns(s_m, t_m, beta=beta, log_floor=log_floor)  # (G,)
        matched = (per_group if keep is None else per_group * keep).sum() / denom

    unmatched = student_merged.new_zeros(())
    stats: dict[str, torch.Tensor] = {}
    if split.student_unmatched.numel() and split.teacher_unmatched.numel():
        l1, stats = sorted_l1(s_u, t_u.to(s_u.dtype), mode=mode, fast_k=fast_k, fast_tol=fast_tol)  # (G,)
        unmatched = (l1 if keep is None else l1 * keep).sum() / denom

    loss = weight * (w_m * matched + w_u * unmatched)
    diag = {"matched": float(matched.detach()), "unmatched": float(unmatched.detach()), "matched_weight": w_m,
            "unmatched_weight": w_u, "groups": float(groups), "matched_columns": float(split.num_matched)}
    if stats:
        bound = stats["bound"] if keep is None else stats["bound"] * keep.detach().double()
        diag["fast_error_bound"] = float(weight * w_u * bound.sum() / float(denom))
        diag["fast_exact_groups"] = float(stats["exact_rows"])
    return loss, diag
