"""NumPy kernels of the cached top-k losses (CPU, float32, exact ULD mode).

``topk.py`` defines the tail model and holds the reference path (torch, any device or dtype). There the modelled
teacher is built as (G, V)-sized torch tensors in log space (about ten passes over them), then exponentiated again by
the loss. Here it is evaluated row by row inside the loss kernels, on the same row chunks and worker threads as the
other NumPy loss kernels:

* ``tail_sorted_l1``: sorted L1 (ULD) between student rows and the teacher's cached entries plus its power-law tail
  at the tail grid ranks (``topk._tail_block``, grid = the block's width);
* ``placed_jsd``: the matched part's "placed" bracket, the floored generalized JSD between student rows and the tail
  model placed on the matched columns (``topk._placement``), with the student's unfloored row mass on the side.

Every tail row is ``exp(-a * D)`` for a per-k offset vector ``D`` (log rank ratios, shared by the rows with the same
number of cached entries), scaled to the row's tail mass, so one multiply and one exp per entry. The results equal the
reference path up to float32 rounding (tests/test_losses_topk.py).

Dims: G groups (rows), c rows of a chunk, Vs student vocabulary, W teacher columns of the block (also the tail grid
length), M matched columns, K cached entries per group.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .hybrid import floored_jsd_rows
from .uld import _chunks, _run_chunks, exact_probs_numpy


def log_rank_offsets(positions: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """(n,) tail positions in (0, 1) -> (n,) float32 ``log(r / k) - min``, r = k + position * (V - k) the tail rank.

    The power-law value at rank r is proportional to ``exp(-a * offset)``; the minimum is subtracted so the largest
    value is exp(0) = 1 (no underflow before the row is scaled to its mass)."""
    k = max(int(k), 1)
    logs = np.log1p(positions * ((vocab_size - k) / k))
    return (logs - logs.min(initial=np.inf) if logs.size else logs).astype(np.float32)


def grid_positions(length: int) -> np.ndarray:
    """(N,) float64 positions (i + 1/2) / N of the tail grid (``topk._tail_block``)."""
    return (np.arange(length, dtype=np.float64) + 0.5) / max(length, 1)


def _offsets_by_k(counts: np.ndarray, positions: np.ndarray, vocab_size: int) -> dict[int, np.ndarray]:
    return {int(k): log_rank_offsets(positions, int(k), vocab_size) for k in np.unique(np.maximum(counts, 1))}


def _scaled_power_row(out: np.ndarray, offsets: np.ndarray, exponent: float, log_mass: float) -> None:
    """out (n,) <- ``exp(-exponent * offsets)`` scaled to sum to exp(log_mass) (zeros when there is no mass)."""
    if not out.size:
        return
    np.multiply(offsets, -exponent, out=out)
    np.exp(out, out=out)
    total = float(out.sum())
    if not (math.isfinite(log_mass) and total > 0):
        out.fill(0.0)
        return
    out *= math.exp(log_mass - math.log(total))


# ----------------------------------------------------------------------------------------------------- sorted L1 --
def _teacher_desc_rows(cached_logprobs: np.ndarray, counts: np.ndarray, slots: np.ndarray, exponent: np.ndarray,
                       log_mass: np.ndarray, model_k: np.ndarray, offsets: dict[int, np.ndarray],
                       width: int) -> np.ndarray:
    """(c, W) float32 descending teacher rows: each row's cached entries, then its ``slots`` tail grid values, then
    zeros. A tail that starts above the smallest cached entry (its scale can exceed 1) is merged by a short sort."""
    rows = cached_logprobs.shape[0]
    cached = np.sort(np.exp(cached_logprobs), axis=1)[:, ::-1]  # (c, K) descending; absent entries (-inf) are 0
    teacher = np.empty((rows, width), dtype=np.float32)
    for r in range(rows):
        count, slot = int(counts[r]), int(slots[r])
        row = teacher[r]
        row[:count] = cached[r, :count]
        tail = row[count:count + slot]
        _scaled_power_row(tail, offsets[int(model_k[r])][:slot], float(exponent[r]), float(log_mass[r]))
        row[count + slot:] = 0.0
        if count and slot and tail[0] > row[count - 1]:
            above = int(np.searchsorted(-tail, -row[count - 1], side="left"))  # tail entries above it
            row[:count + above] = np.sort(row[:count + above])[::-1]
    return teacher


class _TailSortedL1(torch.autograd.Function):
    """(G,) sorted L1 between student rows (G, Vs) and the modelled teacher rows; gradient w.r.t. the student only."""

    @staticmethod
    def forward(ctx, student_logprobs, cached_logprobs, counts, slots, exponent, log_mass, model_k, offsets, width):
        need = ctx.needs_input_grad[0]
        s_all = student_logprobs.detach().contiguous().numpy()
        c_all = cached_logprobs.detach().contiguous().numpy()
        rows = s_all.shape[0]
        l1 = np.empty(rows, dtype=np.float64)
        grad = np.empty_like(s_all) if need else None

        def one(span):
            a, b = span
            teacher = _teacher_desc_rows(c_all[a:b], counts[a:b], slots[a:b], exponent[a:b], log_mass[a:b],
                                         model_k[a:b], offsets, width)
            part, part_grad, _ = exact_probs_numpy(np.exp(s_all[a:b]), teacher, need, False, t_desc=True)
            l1[a:b] = part
            if need:
                grad[a:b] = part_grad

        _run_chunks(one, _chunks(rows, max(width, s_all.shape[1])))
        ctx.save_for_backward(None if grad is None else torch.from_numpy(grad))
        return torch.from_numpy(l1).to(student_logprobs.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.unsqueeze(1), None, None, None, None, None, None, None, None


def tail_sorted_l1(student_logprobs: torch.Tensor, cached_logprobs: torch.Tensor, counts: torch.Tensor,
                   slots: torch.Tensor, exponent: torch.Tensor, log_mass: torch.Tensor, model_k: torch.Tensor,
                   vocab_size: int, width: int) -> torch.Tensor:
    """Per-group ULD against a modelled teacher block.

    Args:
        student_logprobs: (G, Vs) float32 CPU student log-values of the block's columns.
        cached_logprobs: (G, K) cached teacher log-values in this block (any order), ``counts[g]`` finite, -inf else.
        counts: (G,) cached entries; slots: (G,) tail grid values of the row (``counts + slots <= width``).
        exponent: (G,) tail exponents a; log_mass: (G,) log tail mass of the block; model_k: (G,) the tail model's k
            (cached entries over the whole vocabulary, >= 1); vocab_size: V of the rank scale; width: W.
    Returns:
        (G,) sorted L1 distances (``topk.sorted_l1`` against ``topk._merge_desc`` of the same rows).
    """
    counts_np, slots_np = counts.cpu().numpy(), slots.cpu().numpy()
    if counts_np.size and int((counts_np + slots_np).max()) > width:
        raise ValueError(f"cached entries + tail slots exceed the block width {width}.")
    k_np = model_k.cpu().numpy()
    offsets = _offsets_by_k(k_np, grid_positions(width), vocab_size)  # the grid is the block: batch-independent
    return _TailSortedL1.apply(student_logprobs, cached_logprobs, counts_np, slots_np,
                               exponent.double().cpu().numpy(), log_mass.double().cpu().numpy(), k_np, offsets,
                               width)


# ----------------------------------------------------------------------------------------------------- placed JSD --
def _placed_jsd_rows(s_lp: np.ndarray, top_cols: np.ndarray, exponent: np.ndarray, log_mass: np.ndarray,
                     model_k: np.ndarray, offsets: dict[int, np.ndarray], beta: float, log_floor: float,
                     need: bool, p_raw: np.ndarray):
    """(c, M) student log-values -> floored JSD row sums (c,) float64 and d sums / d s_lp (c, M) or None.

    The teacher row is the placed tail scaled to exp(log_mass), -inf on the row's top-k columns (``top_cols``, -1 =
    none). ``p_raw`` (c, M) receives exp(s_lp), the student's unfloored probabilities."""
    rows, width = s_lp.shape
    t_log = np.empty((rows, width), dtype=np.float32)
    p_t = np.empty((rows, width), dtype=np.float32)
    for r in range(rows):
        lt, pt = t_log[r], p_t[r]
        np.multiply(offsets[int(model_k[r])], -float(exponent[r]), out=lt)
        lt[top_cols[r][top_cols[r] >= 0]] = -np.inf
        np.exp(lt, out=pt)
        total = float(pt.sum())
        if math.isfinite(float(log_mass[r])) and total > 0:
            shift = float(log_mass[r]) - math.log(total)
            lt += shift
            pt *= math.exp(shift)
        else:
            lt.fill(-np.inf)
            pt.fill(0.0)
    floor_p = np.float32(math.exp(log_floor))
    np.exp(s_lp, out=p_raw)
    s = np.maximum(s_lp, log_floor)
    t = np.maximum(t_log, log_floor, out=t_log)
    p_s = np.maximum(p_raw, floor_p)
    np.maximum(p_t, floor_p, out=p_t)
    sums, g = floored_jsd_rows(s, t, p_s, p_t, beta)
    if not need:
        return sums, None
    np.multiply(g, s_lp >= log_floor, out=g)  # no gradient where the floor clamps
    return sums, g


class _PlacedJSD(torch.autograd.Function):
    """(G, M) student log-values -> (G,) placed JSD sums, (G,) student row mass sum_j exp(s_j), (G, K) the student
    values on the top-k columns (-inf where none); backward needs no exp (the probabilities are kept)."""

    @staticmethod
    def forward(ctx, student_logprobs, top_cols, exponent, log_mass, model_k, offsets, beta, log_floor):
        need = ctx.needs_input_grad[0]
        s_all = student_logprobs.detach().contiguous().numpy()
        rows, width = s_all.shape
        sums = np.empty(rows, dtype=np.float64)
        p_raw = np.empty_like(s_all)
        grad = np.empty_like(s_all) if need else None

        def one(span):
            a, b = span
            part, part_grad = _placed_jsd_rows(s_all[a:b], top_cols[a:b], exponent[a:b], log_mass[a:b],
                                               model_k[a:b], offsets, beta, log_floor, need, p_raw[a:b])
            sums[a:b] = part
            if need:
                grad[a:b] = part_grad

        _run_chunks(one, _chunks(rows, width))
        valid = top_cols >= 0
        cols = torch.from_numpy(np.where(valid, top_cols, 0))
        s_top = student_logprobs.detach().gather(1, cols).masked_fill_(torch.from_numpy(~valid), -math.inf)
        ctx.save_for_backward(None if grad is None else torch.from_numpy(grad), torch.from_numpy(p_raw), cols,
                              torch.from_numpy(valid))
        dtype = student_logprobs.dtype
        mass = torch.from_numpy(p_raw.sum(axis=1, dtype=np.float64)).to(dtype)
        return torch.from_numpy(sums).to(dtype), mass, s_top

    @staticmethod
    def backward(ctx, grad_sums, grad_mass, grad_top):
        grad, p_raw, cols, valid = ctx.saved_tensors
        out = torch.addcmul(grad * grad_sums.unsqueeze(1), p_raw, grad_mass.unsqueeze(1))  # d mass / d s_j = p_j
        if grad_top is not None:
            out.scatter_add_(1, cols, grad_top.masked_fill(~valid, 0.0))
        return out, None, None, None, None, None, None, None


def placed_jsd(student_logprobs: torch.Tensor, top_cols: torch.Tensor, exponent: torch.Tensor,
               log_mass: torch.Tensor, model_k: torch.Tensor, placement: torch.Tensor, vocab_size: int, *,
               beta: float, log_floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The placed bracket of the matched part, the student's mass on the matched columns, its top-k values.

    Args:
        student_logprobs: (G, M) float32 CPU student log-values of the matched columns.
        top_cols: (G, K) matched-column index of each cached id, -1 where the id is unmatched or absent.
        exponent, log_mass, model_k: (G,) tail exponent, log tail mass on the matched columns, the model's k.
        placement: (M,) float64 positions in (0, 1) of the tail on the matched columns (``topk._placement``).
        vocab_size: V of the rank scale. beta, log_floor: as ``hybrid.jsd_on_columns``.
    Returns:
        (G,) floored JSD sums over all M columns with the teacher at -inf (floored) on the top-k columns, as
        ``jsd_on_columns(student, topk TailModel.log_values(...))``; (G,) ``sum_j exp(student[g, j])``; (G, K)
        ``student[g, top_cols[g, i]]`` (-inf where top_cols is -1), all differentiable w.r.t. the student.
    """
    k_np = model_k.cpu().numpy()
    offsets = _offsets_by_k(k_np, placement.cpu().numpy(), vocab_size)
    return _PlacedJSD.apply(student_logprobs, top_cols.cpu().numpy(), exponent.double().cpu().numpy(),
                            log_mass.double().cpu().numpy(), k_np, offsets, float(beta), float(log_floor))


__all__ = ["grid_positions", "log_rank_offsets", "placed_jsd", "tail_sorted_l1"]
