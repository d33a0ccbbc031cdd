"""Universal Logit Distillation (ULD) loss on merged log-probabilities (DESIGN §4).

Per group g: ``exp`` both merged rows, sort each descending, zero-pad the shorter vocabulary to the longer one and
take the L1 distance summed over the vocabulary::

    uld_g = sum_r | sort_desc(p_s[g])[r] - sort_desc(p_t[g])[r] |

The loss is ``weight * sum_g uld_g / denominator`` (DESIGN §4 normalization; TRL 1.16 divides each row's sum by that
row's group count and then averages rows — equal for one row, see ``tests/test_losses_trl_parity.py``).

Modes:

* ``"exact"`` (default): full sort. On CPU float32 the sort runs in NumPy's SIMD sort on int64 keys that pack the
  probability's bit pattern (monotone for non-negative floats) with the column index, so one values-only sort yields
  both the sorted values and the permutation (about 10x faster than ``torch.sort`` here). Autograd never stores a sort:
  a custom ``autograd.Function`` scatters ``sign(sorted diff) * p`` back to the original columns in the forward pass
  and keeps only that one (G, V) float tensor for backward. Rows are processed in chunks (bounded temporaries) on
  ``torch.get_num_threads()`` threads. Other devices/dtypes use ``torch.sort`` with the same algebra.
* ``"fast"``: a partial sort (O(V) selection: ``np.argpartition`` on CPU, ``torch.topk`` elsewhere) of the top
  ``fast_k`` ranks of both sides (exact there) plus the tails summarized as ``|S_tail - T_tail|`` (S, T = the mass
  outside each side's top-k). The true tail term lies in ``[|S_tail - T_tail|, S_tail + T_tail]``, so the absolute
  error per group is at most ``2 * min(S_tail, T_tail)``; the summed bound (divided by the same denominator) is
  reported as ``diag["fast_error_bound"]`` with the neglected masses. Gradients are exact on the top-k ranks; tail
  columns get ``sign(S_tail - T_tail)``. If the summed bound exceeds ``fast_tol`` (default 1e-3) times the summed
  value, the groups with the largest bounds are recomputed with the full sort until it does not, so the relative
  error of the returned loss is at most ``fast_tol``; ``diag["fast_exact_groups"]`` counts those groups. Which
  groups get sorted depends on the call's batch, so micro-batches match one big batch within ``fast_tol`` (exactly
  with ``fast_tol=None``, which keeps the per-group bound but no guarantee).

Mapping of TRL's ``uld_skip_student_eos`` / ``uld_skip_teacher_eos``: TRL drops the last completion token (EOS /
end-of-turn) of each side from the answer span before aligning. Here those tokens simply carry group id ``-1`` in
``student_group_ids`` / ``teacher_group_ids`` (the alignment stage does this for every special/end-of-turn token), so
they never enter ``merged_logprobs`` and never reach this function. TRL's ``skip_*_eos=False`` corresponds to giving
the end-of-turn tokens of both sides a shared group of their own.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch

from ._common import Denominator, check_2d, resolve_denominator

UldMode = Literal["exact", "fast"]
ULD_MODES: tuple[str, ...] = ("exact", "fast")
DEFAULT_FAST_K = 4096
DEFAULT_FAST_TOL = 1e-3  # fast mode: guaranteed relative error of the summed ULD (worst groups sorted fully)
_LITTLE_ENDIAN = sys.byteorder == "little"
_CHUNK_ELEMENTS = 1 << 20  # ~1M elements per row chunk (per side) bounds sort temporaries to ~30 MB per thread


def _chunks(rows: int, width: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool), made on first use


def _pool(workers: int) -> ThreadPoolExecutor:
    """One worker pool per process (starting threads on every call cost ~1 ms each); a forked child makes its own."""
    global _POOL
    pid = os.getpid()
    if _POOL is None or _POOL[:2] != (pid, workers):
        if _POOL is not None and _POOL[0] == pid:
            _POOL[2].shutdown(wait=False)
        _POOL = (pid, workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gold-loss"))
    return _POOL[2]


def _run_chunks(fn, spans):
    """``[fn(span) for span in spans]`` on ``torch.get_num_threads()`` threads (NumPy releases the GIL)."""
    threads = max(1, torch.get_num_threads())
    if threads == 1 or len(spans) == 1:
        return [fn(span) for span in spans]
    return list(_pool(threads).map(fn, spans))


# ----------------------------------------------------------------------------------------------------- exact mode --
def _np_sort_asc(p: np.ndarray, with_perm: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Ascending sort of non-negative float32 rows (c, V); with the permutation when asked.

    The permutation comes from one values-only sort of int64 keys: high word the float's bits (non-negative floats
    order like their bit patterns), low word the column. Values and columns are read back as strided views of the
    sorted keys (no unpacking pass)."""
    if not with_perm:
        return np.sort(p, axis=1), None
    rows, width = p.shape
    key = np.empty((rows, width), dtype=np.int64)
    if _LITTLE_ENDIAN:
        words = key.view(np.int32)  # (c, 2V): [low, high] word pairs
        words[:, 0::2] = np.arange(width, dtype=np.int32)
        words[:, 1::2] = p.view(np.int32)
        key.sort(axis=1)
        return words[:, 1::2].view(np.float32), words[:, 0::2]
    key[:] = p.view(np.int32)
    key <<= 32
    key |= np.arange(width, dtype=np.int64)
    key.sort(axis=1)
    perm = key & 0xFFFFFFFF
    key >>= 32
    return key.astype(np.int32).view(np.float32), perm


def _scatter_rows(out: np.ndarray, perm: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``out[r, perm[r, i]] = values[r, i]`` for all rows (a row loop of fancy assignments beats put_along_axis)."""
    for r in range(out.shape[0]):
        out[r][perm[r]] = values[r]
    return out


def _exact_chunk_numpy(s_lp: torch.Tensor, t_lp: torch.Tensor, need_s: bool, need_t: bool, t_desc: bool = False):
    """(c, Vs), (c, Vt) log-probs -> per-row L1 (c,) float64 and gradient directions d uld / d logp."""
    s = np.exp(s_lp.detach().numpy())  # NumPy, not torch: this runs on worker threads (no nested OpenMP)
    t = np.exp(t_lp.detach().numpy())
    return exact_probs_numpy(s, t, need_s, need_t, t_desc)


def exact_probs_numpy(s: np.ndarray, t: np.ndarray, need_s: bool, need_t: bool, t_desc: bool = False):
    """``_exact_chunk_numpy`` on probabilities: (c, Vs), (c, Vt) float32 (t rows descending when ``t_desc``)."""
    vs, vt = s.shape[1], t.shape[1]
    length = min(vs, vt)
    s_sorted, s_perm = _np_sort_asc(s, need_s)
    if t_desc:  # rows already sorted descending: reverse instead of sorting
        t_sorted = t[:, ::-1]
        t_perm = np.broadcast_to(np.arange(vt - 1, -1, -1), t.shape) if need_t else None
    else:
        t_sorted, t_perm = _np_sort_asc(t, need_t)
    # ascending order: the largest ranks sit at the right end; zero padding pairs with the left ends
    diff = s_sorted[:, vs - length:] - t_sorted[:, vt - length:]  # (c, L)
    l1 = np.abs(diff).sum(axis=1).astype(np.float64)  # pairwise float32 sums, no float64 copy of the rows
    l1 += s_sorted[:, : vs - length].sum(axis=1)
    l1 += t_sorted[:, : vt - length].sum(axis=1)
    sign = np.sign(diff)
    grad_s = grad_t = None
    if need_s:
        direction = s_sorted.copy()  # rank r of the student: sign(diff) * p; padded-against-zero ranks: +p
        direction[:, vs - length:] *= sign
        grad_s = _scatter_rows(np.empty_like(s), s_perm, direction)
    if need_t:
        direction = t_sorted.copy()
        direction[:, vt - length:] *= -sign
        grad_t = _scatter_rows(np.empty_like(t), t_perm, direction)
    return (torch.from_numpy(l1), None if grad_s is None else torch.from_numpy(grad_s),
            None if grad_t is None else torch.from_numpy(grad_t))


def _exact_chunk_torch(s_lp: torch.Tensor, t_lp: torch.Tensor, need_s: bool, need_t: bool, t_desc: bool = False):
    s = s_lp.detach().exp()
    t = t_lp.detach().exp()
    vs, vt = s.shape[1], t.shape[1]
    length = min(vs, vt)
    s_sorted, s_perm = s.sort(dim=1)
    if t_desc:
        t_sorted = t.flip(1)
        t_perm = torch.arange(vt - 1, -1, -1, device=t.device).expand(t.shape[0], vt)
    else:
        t_sorted, t_perm = t.sort(dim=1)
    diff = s_sorted[:, vs - length:] - t_sorted[:, vt - length:]
    l1 = (diff.abs().sum(1).double() + s_sorted[:, : vs - length].sum(1).double()
          + t_sorted[:, : vt - length].sum(1).double())
    sign = diff.sign()
    grad_s = grad_t = None
    if need_s:
        direction = s_sorted.clone()
        direction[:, vs - length:] *= sign
        grad_s = torch.empty_like(s).scatter_(1, s_perm, direction)
    if need_t:
        direction = t_sorted.clone()
        direction[:, vt - length:] *= -sign
        grad_t = torch.empty_like(t).scatter_(1, t_perm, direction)
    return l1, grad_s, grad_t


# ------------------------------------------------------------------------------------------------------ fast mode --
def _fast_chunk(s_lp: torch.Tensor, t_lp: torch.Tensor, need_s: bool, need_t: bool, k: int, t_desc: bool = False):
    s = s_lp.detach().exp()
    t = t_lp.detach().exp()
    s_top, s_idx = s.topk(k, dim=1)  # (c, k) descending
    if t_desc:
        t_top, t_idx = t[:, :k], torch.arange(k, device=t.device).expand(t.shape[0], k)
    else:
        t_top, t_idx = t.topk(k, dim=1)
    diff = s_top - t_top
    # float32 sums (cascade summation) converted afterwards: a float64 `dtype=` would copy the whole (c, V) tensor
    s_tail = (s.sum(1).double() - s_top.sum(1).double()).clamp_min(0)
    t_tail = (t.sum(1).double() - t_top.sum(1).double()).clamp_min(0)
    l1 = diff.abs().sum(1).double() + (s_tail - t_tail).abs()
    bound = 2 * torch.minimum(s_tail, t_tail)
    tail_sign = (s_tail - t_tail).sign().to(s.dtype).unsqueeze(1)  # (c, 1)
    head_sign = diff.sign()
    grad_s = grad_t = None
    if need_s:
        grad_s = (s * tail_sign).scatter_(1, s_idx, s_top * head_sign)
    if need_t:
        grad_t = (t * -tail_sign).scatter_(1, t_idx, t_top * -head_sign)
    return l1, grad_s, grad_t, bound, s_tail, t_tail


def _top_desc(values: np.ndarray, k: int, with_idx: bool):
    """Top-k of each row, sorted descending, by O(V) selection (np.argpartition) plus a sort of k entries."""
    width = values.shape[1]
    if with_idx:
        idx = np.argpartition(values, width - k, axis=1)[:, width - k:]
        top = np.take_along_axis(values, idx, axis=1)
    else:
        idx, top = None, np.partition(values, width - k, axis=1)[:, width - k:]
    order = np.argsort(-top, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    if with_idx:
        idx = np.take_along_axis(idx, order, axis=1)
    return top, idx


def _fast_chunk_numpy(s_lp: torch.Tensor, t_lp: torch.Tensor, need_s: bool, need_t: bool, k: int,
                      t_desc: bool = False):
    s = np.exp(s_lp.detach().numpy())
    t = np.exp(t_lp.detach().numpy())
    s_top, s_idx = _top_desc(s, k, need_s)
    if t_desc:
        t_top, t_idx = t[:, :k], (np.broadcast_to(np.arange(k), (t.shape[0], k)) if need_t else None)
    else:
        t_top, t_idx = _top_desc(t, k, need_t)
    diff = s_top - t_top  # (c, k)
    s_tail = np.clip(s.sum(axis=1).astype(np.float64) - s_top.sum(axis=1), 0, None)
    t_tail = np.clip(t.sum(axis=1).astype(np.float64) - t_top.sum(axis=1), 0, None)
    l1 = np.abs(diff).sum(axis=1).astype(np.float64) + np.abs(s_tail - t_tail)
    bound = 2 * np.minimum(s_tail, t_tail)
    tail_sign = np.sign(s_tail - t_tail).astype(s.dtype)[:, None]
    head_sign = np.sign(diff)
    grad_s = grad_t = None
    if need_s:
        grad_s = s * tail_sign
        np.put_along_axis(grad_s, s_idx, s_top * head_sign, axis=1)
    if need_t:
        grad_t = t * -tail_sign
        np.put_along_axis(grad_t, t_idx, t_top * -head_sign, axis=1)
    as_t = (lambda a: None if a is None else torch.from_numpy(a))
    return (torch.from_numpy(l1), as_t(grad_s), as_t(grad_t), torch.from_numpy(bound), torch.from_numpy(s_tail),
            torch.from_numpy(t_tail))


def _rows_to_sort_fully(bound: torch.Tensor, l1: torch.Tensor, fast_tol: float | None) -> torch.Tensor:
    """Fewest rows (largest bounds first) whose full sort brings ``sum(bound) <= fast_tol * sum(l1)``.

    ``l1`` is the fast value, a lower bound of the exact one, so the remaining error is at most ``fast_tol`` times
    the exact sum: the relative error of the returned sum is bounded by ``fast_tol``."""
    if fast_tol is None or bound.numel() == 0:
        return bound.new_zeros(0, dtype=torch.long)
    budget = fast_tol * float(l1.double().sum())
    order = torch.argsort(bound, descending=True)
    remaining = float(bound.sum()) - torch.cumsum(bound[order].double(), 0)  # error left after fixing rows 0..i
    if float(bound.sum()) <= budget:
        return bound.new_zeros(0, dtype=torch.long)
    count = int((remaining > budget).sum()) + 1
    return order[:count]


class _SortedL1(torch.autograd.Function):
    """Per-group sorted L1 (G,) with a backward that needs no stored sort indices."""

    @staticmethod
    def forward(ctx, student_logprobs, teacher_logprobs, mode, fast_k, stats, fast_tol=None, t_desc=False):
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = student_logprobs.shape[0]
        width = max(student_logprobs.shape[1], teacher_logprobs.shape[1])
        use_numpy = (student_logprobs.device.type == "cpu" and student_logprobs.dtype == torch.float32
                     and teacher_logprobs.dtype == torch.float32)

        def one(span):
            a, b = span
            s, t = student_logprobs[a:b], teacher_logprobs[a:b]
            if mode == "fast":
                if use_numpy:
                    return _fast_chunk_numpy(s.contiguous(), t.contiguous(), need_s, need_t, fast_k, t_desc)
                return _fast_chunk(s, t, need_s, need_t, fast_k, t_desc)
            if use_numpy:
                return _exact_chunk_numpy(s.contiguous(), t.contiguous(), need_s, need_t, t_desc)
            return _exact_chunk_torch(s, t, need_s, need_t, t_desc)

        spans = _chunks(rows, width)
        parts = _run_chunks(one, spans) if use_numpy else [one(span) for span in spans]
        l1 = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)
        grad_s = torch.cat([p[1] for p in parts]) if need_s and parts else None
        grad_t = torch.cat([p[2] for p in parts]) if need_t and parts else None
        if mode == "fast" and parts:
            bound = torch.cat([p[3] for p in parts])
            stats["student_tail"] = torch.cat([p[4] for p in parts])
            stats["teacher_tail"] = torch.cat([p[5] for p in parts])
            redo = _rows_to_sort_fully(bound, l1, fast_tol)
            if redo.numel():  # rows whose bound exceeds the tolerance: sort them fully
                exact = _exact_chunk_numpy if use_numpy else _exact_chunk_torch
                s_rows = student_logprobs[redo].contiguous()
                t_rows = teacher_logprobs[redo].contiguous()
                r_l1, r_gs, r_gt = exact(s_rows, t_rows, need_s, need_t, t_desc)
                l1[redo] = r_l1.to(l1.dtype)
                bound[redo] = 0.0
                if grad_s is not None:
                    grad_s[redo] = r_gs.to(grad_s.dtype)
                if grad_t is not None:
                    grad_t[redo] = r_gt.to(grad_t.dtype)
            stats["bound"] = bound
            stats["exact_rows"] = torch.tensor(float(redo.numel()))
        ctx.save_for_backward(grad_s, grad_t)
        return l1.to(device=student_logprobs.device, dtype=student_logprobs.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_s, grad_t = ctx.saved_tensors
        out_s = None if grad_s is None else grad_s.to(grad_out.device) * grad_out.unsqueeze(1)
        out_t = None if grad_t is None else grad_t.to(grad_out.device) * grad_out.unsqueeze(1)
        return out_s, out_t, None, None, None, None, None


def sorted_l1(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, *, mode: UldMode = "exact",
              fast_k: int = DEFAULT_FAST_K,
              fast_tol: float | None = DEFAULT_FAST_TOL,
              teacher_sorted: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-group ULD distance.

    Args:
        student_logprobs: (G, Vs) merged log-probabilities (may be unnormalized, may hold -inf).
        teacher_logprobs: (G, Vt) merged log-probabilities.
        mode: "exact" (full sort) or "fast" (top-``fast_k`` ranks exact + tail mass bound).
        fast_tol: fast mode only: the rows with the largest error bounds are recomputed by a full sort until the
            summed bound is <= fast_tol times the summed value (relative error of the sum <= fast_tol); None: never.
        teacher_sorted: the teacher rows are already sorted in descending order (their sort is skipped; the caller
            guarantees the order, e.g. ``topk.dense_teacher``).
    Returns:
        (G,) L1 distances in the student dtype, and a stats dict of (G,) float64 tensors ("bound", "student_tail",
        "teacher_tail") in fast mode (empty in exact mode).
    """
    if mode not in ULD_MODES:
        raise ValueError(f"ULD mode must be 'exact' or 'fast' (got {mode!r}).")
    check_2d("student_logprobs", student_logprobs)
    check_2d("teacher_logprobs", teacher_logprobs, rows=student_logprobs.shape[0])
    stats: dict[str, torch.Tensor] = {}
    if mode == "fast" and fast_k >= min(student_logprobs.shape[1], teacher_logprobs.shape[1]):
        mode = "exact"  # top-k covers the smaller vocabulary: the full sort is as cheap and exact
    if mode == "fast" and fast_k < 1:
        raise ValueError(f"fast_k must be >= 1 (got {fast_k}).")
    l1 = _SortedL1.apply(student_logprobs, teacher_logprobs, mode, fast_k, stats, fast_tol, teacher_sorted)
    return l1, stats


def uld_loss(student_merged: torch.Tensor, teacher_merged: torch.Tensor, *, denominator: Denominator = None,
             mode: UldMode = "exact", fast_k: int = DEFAULT_FAST_K, fast_tol: float | None = DEFAULT_FAST_TOL,
             weight: float = 1.0, group_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """ULD loss between merged distributions of aligned groups.

    Args:
        student_merged: (G, Vs) merged student log-probabilities (``merged_logprobs``), temperature already applied.
        teacher_merged: (G, Vt) merged teacher log-probabilities (no gradient needed).
        denominator: total number of valid groups of the optimizer window (all micro-batches and processes);
            ``None`` = the local number of groups.
        mode: "exact" (default, full sort, parity with TRL) or "fast" (see module docstring).
        fast_k: ranks handled exactly in fast mode.
        fast_tol: fast mode: relative error tolerance of this call's sum (worst groups are sorted fully until met).
        weight: multiplies the loss (``uld_distillation_weight``).
        group_mask: optional (G,) bool, False drops a group (its rows contribute nothing).
    Returns:
        loss: scalar ``weight * sum_g uld_g / denominator``.
        diag: floats — "uld" (the loss before ``weight``), "groups", and in fast mode "fast_error_bound"
        (bound on |fast - exact| of the returned loss), "student_tail_mass", "teacher_tail_mass" (mean per group).
    """
    l1, stats = sorted_l1(student_merged, teacher_merged, mode=mode, fast_k=fast_k, fast_tol=fast_tol)  # (G,)
    groups = l1.shape[0]
    if group_mask is not None:
        l1 = l1 * group_mask.to(l1.dtype)
        groups = int(group_mask.sum())
    denom = resolve_denominator(denominator, groups, what="uld_loss")
    loss = l1.sum() / denom
    diag = {"uld": float(loss.detach()), "groups": float(groups)}
    if stats:
        mask = 1.0 if group_mask is None else group_mask.to(torch.float64)
        diag["fast_error_bound"] = float(weight * (stats["bound"] * mask).sum() / float(denom))
        diag["student_tail_mass"] = float((stats["student_tail"] * mask).sum() / max(groups, 1))
        diag["teacher_tail_mass"] = float((stats["teacher_tail"] * mask).sum() / max(groups, 1))
        diag["fast_exact_groups"] = float(stats["exact_rows"])
    return weight * loss, diag

