"""Projection loss: the hybrid loss plus a token-by-token comparison on student tokens that spell several teacher
tokens (multi-digit numbers, partial matches; issue 14).

The projection table (``text.projection``, written by ``gold align`` beside the vocab map) lists, for every student
token that is not byte-identical to a teacher token, the teacher tokens ``t_1..t_n`` (2 <= n <= D, D = 4) its bytes
re-tokenize into. Inside an alignment group the teacher's distribution is known at every position of the teacher's
actual token path ``a_0, a_1, ...`` (the group's teacher tokens). By the chain rule

    log Q(y) = sum_{j < n} log p_t(t_j | ctx, a_<j)

is the teacher's exact log-probability of the bytes of student token y (spelled as t_1..t_n) whenever
``t_1..t_{n-1} = a_0..a_{n-2}`` (the first pieces lie on the path; only the last one is an alternative) and the
group's teacher path has at least n tokens. Such a (group, student token) pair is *live*. Example: group "123"
(student ``123``, teacher ``1``,``2``,``3``): ``123`` gets P(1)P(2|1)P(3|12), every ``12x`` gets P(1)P(2|1)P(x|12),
every ``1x`` P(1)P(x|1); ``45x`` is not live.

Per group g with merged log-probs ``s`` (G, Vs), ``t`` (G, Vt) (first-position merge):

* matched part: exactly ``hybrid.hybrid_loss``'s (floored generalized JSD on the vocab-map columns);
* projected part: on every live pair (g, y), the floored generalized-JSD term (beta) between the student's
  next-token log-prob ``log p_s(y | ctx) = s[g, y] - logsumexp(s[g])`` and ``log Q(y)`` (both are log-probabilities
  of the same bytes at the group's first position, so no continuation factor enters);
* unmatched part: ULD (sorted L1) between the student's remaining columns (unmatched and not live) and the teacher's
  unmatched columns. Live cells are set to probability 0 on the student's ULD side, which removes them: sorted L1
  with zero padding does not change when zero entries are added.

loss = weight * (w_m * matched + w_u * unmatched + w_p * projected) / denominator, w_m, w_u as the hybrid loss,
w_p = ``projected_weight`` (default w_m: it is the same kind of term). With identical tokenizers there is no
projectable token and the loss is the hybrid loss, i.e. the plain per-token generalized JSD (up to the floor).
The projected values need the FIRST-position merge (``uld_token_merge_strategy="first"``).

Exclusive prefixes (``exclusive=True``, the default; GOLDConfig ``uld_projection_exclusive``). The plain chain-rule
values count a string several times: the teacher's first-position merged value of ``1`` in group "123" already is
the probability of the group's whole text, and ``12``, ``12x`` get their own values on top, so the matched part keeps
pulling the student to the single first piece. With exclusive prefixes every student token that spells the start of
the teacher's path keeps only what its longer live extensions do not take: the projected ``12`` gets
P(1)P(2|1)(1 - sum_x P(x|12)) (a leaf such as ``123`` keeps its chain-rule value), and the teacher's matched column
of the first piece ``1`` is lowered to P(1)(1 - sum_x P(x|1)) in place (``first_piece_shift``; no (G, Vt) copy).
Over the student's first token the teacher's values then sum to 1. ``diag["teacher_mass_moved"]`` is the mass taken
from matched first pieces. The top-k error bound below covers the plain projected values only, not this correction.

Top-k teacher (the cache; ``teacher_path_from_topk``): every live factor but the last is the log-prob of an actual
teacher token, which the cache holds exactly (``teacher_token_logprobs``); the last factor comes from the top-K of
the path row it sits on. So the cache must hold, at every teacher completion position, the actual token's log-prob
and the top-K (what ``gold teacher-cache`` stores). A last piece outside the top-K gets teacher probability 0; its
true value t lies in [0, P(prefix) p_K] (p_K the row's smallest cached probability), and for 0 < beta < 1 the
elementwise generalized-JSD term is in [0, beta t log(1/beta) + (1-beta) s log(1/(1-beta))], so such a cell errs by
at most ``max(beta t log(1/beta), (1-beta) s log(1/(1-beta)))``; the sum over those cells (per denominator) is
``diag["projected_topk_error_bound"]``. With K = Vt the top-k form equals the online one.

Diagnostics (sums over groups / denominator, i.e. means per group): "projected", "projected_pairs" (live pairs),
"teacher_mass_matched" / "teacher_mass_unmatched" (teacher first-position probability on vocab-map / other teacher
columns; from the cached entries only with a top-k teacher), "teacher_mass_projected" (sum of Q over live pairs:
teacher probability of the bytes of projected student tokens; it overlaps the matched mass of their first pieces).

Dims: G groups, Vs/Vt vocabularies, P projectable student tokens, D max pieces, L live pairs, K top-k, n rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ._common import TRL_LOG_FLOOR, Denominator, check_2d, generalized_jsd_terms, resolve_denominator
from .hybrid import VocabSplit, hybrid_loss, hybrid_weights
from .merge import MergeStrategy, group_positions, merged_logprobs_from_logits
from .topk import TopkMerged, hybrid_loss_topk, merged_topk
from .uld import DEFAULT_FAST_K, DEFAULT_FAST_TOL, UldMode, _chunks, _run_chunks


@dataclass(frozen=True)
class ProjectionColumns:
    """Projectable student tokens of a pair, sorted by first piece (built once per pair, like ``VocabSplit``).

    student_ids (P,) long; pieces (P, D) long teacher ids (-1 padded); lengths (P,) long n (2..D);
    first_start (Vt + 1,) long: the tokens whose first piece is teacher id t are rows [first_start[t],
    first_start[t + 1]).
    """

    student_ids: torch.Tensor
    pieces: torch.Tensor
    lengths: torch.Tensor
    first_start: torch.Tensor
    student_vocab_size: int
    teacher_vocab_size: int

    @property
    def depth(self) -> int:
        """D, the most teacher pieces of a projectable token."""
        return int(self.pieces.shape[1])

    @property
    def num_columns(self) -> int:
        return int(self.student_ids.shape[0])

    def to(self, device) -> ProjectionColumns:
        return ProjectionColumns(self.student_ids.to(device), self.pieces.to(device), self.lengths.to(device),
                                 self.first_start.to(device), self.student_vocab_size, self.teacher_vocab_size)


def projection_columns(table, student_vocab_size: int, teacher_vocab_size: int) -> ProjectionColumns:
    """``ProjectionColumns`` of a ``text.projection.ProjectionTable`` (its "projected" rows) or of a dict
    ``{student_id: [teacher ids, ...]}`` (entries with fewer than 2 pieces are ignored)."""
    if isinstance(table, dict):
        items = [(int(s), [int(t) for t in p]) for s, p in table.items() if len(p) >= 2]
        if any(s < 0 or min(p) < 0 for s, p in items):
            raise ValueError("projection entries need ids >= 0 ({student_id: [teacher ids]}); got a negative one.")
        student = np.asarray([s for s, _ in items], dtype=np.int64)
        lengths = np.asarray([len(p) for _, p in items], dtype=np.int64)
        depth = int(lengths.max()) if items else 2
        pieces = np.full((len(items), depth), -1, dtype=np.int64)
        for r, (_, p) in enumerate(items):
            pieces[r, :len(p)] = p
    else:
        from gold_pipeline.text.projection import KINDS

        rows = np.flatnonzero(table.kinds == KINDS.index("projected"))  # (P,)
        student = table.student_ids[rows].astype(np.int64)
        starts = table.offsets[rows]
        lengths = table.offsets[rows + 1] - starts
        depth = int(lengths.max()) if rows.size else 2
        at = starts[:, None] + np.arange(depth)  # (P, D)
        inside = np.arange(depth) < lengths[:, None]
        pieces = np.where(inside, table.pieces[np.minimum(at, max(table.pieces.size - 1, 0))], -1)
    keep = (student < student_vocab_size) & (pieces.max(1, initial=-1) < teacher_vocab_size)  # logit widths
    student, pieces, lengths = student[keep], pieces[keep], lengths[keep]
    order = np.lexsort((student, pieces[:, 0])) if student.size else np.zeros(0, dtype=np.int64)
    student, pieces, lengths = student[order], pieces[order], lengths[order]
    counts = np.bincount(pieces[:, 0], minlength=teacher_vocab_size) if student.size else np.zeros(
        teacher_vocab_size, dtype=np.int64)
    first_start = np.zeros(teacher_vocab_size + 1, dtype=np.int64)
    np.cumsum(counts, out=first_start[1:])
    return ProjectionColumns(torch.from_numpy(student), torch.from_numpy(pieces.reshape(-1, depth)),
                             torch.from_numpy(lengths), torch.from_numpy(first_start), student_vocab_size,
                             teacher_vocab_size)


@dataclass(frozen=True)
class ProjectionPair:
    """What the trainer hands the loss step for the projection loss: the vocab split and the projection columns."""

    split: VocabSplit
    columns: ProjectionColumns


# ----------------------------------------------------------------------------------------------- teacher path --
@dataclass
class TeacherPath:
    """The teacher's actual tokens at the start of every group and a way to read its log-probs on that path.

    ids (G, D) long: actual teacher token at offset j of group g, -1 past the group's end.
    rows (G, D) long: the flat teacher row (of ``lookup``) predicting that token, -1 past the end.
    lookup: (rows (L,), cols (L,)) -> (L,) teacher log-probs of token ``cols`` at row ``rows`` (-inf = unknown).
    row_floor: optional (n,) log of the smallest known probability of each row (top-k: the K-th), for the bound.
    scalar: optional (G,) the merged teacher row's constant (sum of the group's later token log-probs), so the
        first-position log-probs are ``merged - scalar``.
    """

    ids: torch.Tensor
    rows: torch.Tensor
    lookup: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    row_floor: torch.Tensor | None = field(default=None)
    scalar: torch.Tensor | None = field(default=None)


def _path_rows(group_ids: torch.Tensor, num_groups: int, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, D) flat row and in-group validity of offset j of each group (groups are contiguous)."""
    first, _ = group_positions(group_ids, num_groups)  # (G,)
    count = torch.bincount(group_ids[group_ids >= 0].long(), minlength=num_groups)  # (G,)
    offset = torch.arange(depth, device=group_ids.device).unsqueeze(0)  # (1, D)
    inside = offset < count.unsqueeze(1)  # (G, D)
    return torch.where(inside, first.unsqueeze(1) + offset, -1), inside


def teacher_path_from_logits(logits: torch.Tensor, token_ids: torch.Tensor, group_ids: torch.Tensor,
                             num_groups: int, depth: int, temperature: float = 1.0,
                             merged: torch.Tensor | None = None) -> TeacherPath:
    """Path of an online teacher.

    Args:
        logits: (n, Vt) raw logits (row i predicts token_ids[i]); token_ids, group_ids: (n,) with local group ids
            0..G-1 (-1 = excluded).
        merged: optional (G, Vt) first-position merged teacher log-probs of the same groups. With it only the rows
            after each group's first one are normalized (a group's first row is ``merged - scalar``, the scalar
            being the sum of those rows' token log-probs), which skips a (G, Vt) pass.
    """
    rows, inside = _path_rows(group_ids, num_groups, depth)
    ids = torch.where(inside, token_ids.long()[rows.clamp_min(0)], -1)
    x = logits.detach()
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    n = x.shape[0]
    is_first = torch.zeros(n, dtype=torch.bool, device=x.device)
    is_first[rows[:, 0]] = True
    later = ((group_ids >= 0) & ~is_first).nonzero().squeeze(1)  # (n_l,) rows after a group's first
    lse = torch.full((n,), math.nan, dtype=x.dtype, device=x.device)  # (n,) log-normalizer of the later rows
    later_x = x[later] / temperature  # (n_l, Vt)
    lse[later] = _row_logsumexp(later_x)
    token_lp = later_x.gather(1, token_ids.long()[later].unsqueeze(1)).squeeze(1) - lse[later]
    scalar = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, group_ids.long()[later],
                                                                                token_lp)  # (G,)
    group_of_row = torch.full((n,), -1, dtype=torch.long, device=x.device)
    group_of_row[rows[:, 0]] = torch.arange(num_groups, device=x.device)
    base = None if merged is None else merged.detach()

    def lookup(at: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        out = torch.empty(at.shape, dtype=x.dtype, device=x.device)
        first = is_first[at]
        if base is not None:
            g = group_of_row[at[first]]
            out[first] = base[g, cols[first]].to(x.dtype) - scalar[g]
        else:
            first_rows = at[first]
            unique, inverse = torch.unique(first_rows, return_inverse=True)
            row_x = x[unique] / temperature
            out[first] = row_x[inverse, cols[first]] - _row_logsumexp(row_x)[inverse]
        rest = ~first
        out[rest] = x[at[rest], cols[rest]] / temperature - lse[at[rest]]
        return out

    return TeacherPath(ids, rows, lookup, scalar=scalar)


def _row_logsumexp(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(n, V) -> (r,) logsumexp of rows ``rows`` (r,) (None: all n), without autograd (NumPy threads for CPU
    float32; the rows are gathered chunk by chunk, never as one (r, V) copy)."""
    count = x.shape[0] if rows is None else rows.numel()
    if count == 0:
        return x.new_zeros(0)
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return torch.logsumexp(x if rows is None else x[rows], dim=1)
    a = x.contiguous().numpy()
    at = None if rows is None else rows.numpy()
    out = np.empty(count, dtype=np.float32)

    def one(span):
        lo, hi = span
        block = a[lo:hi] if at is None else a[at[lo:hi]]
        top = block.max(axis=1, keepdims=True)
        out[lo:hi] = np.log(np.exp(block - top).sum(axis=1)) + top[:, 0]

    _run_chunks(one, _chunks(count, a.shape[1]))
    return torch.from_numpy(out)


class _RowLogprobCells(torch.autograd.Function):
    """(G, V) unnormalized log rows x, (L,) rows and cols -> (L,) ``x[rows, cols] - logsumexp(x[rows])``.

    Backward writes the one (G, V) gradient directly: the cells' gradients, minus softmax(x[r]) times the sum of
    row r's cell gradients on each used row, 0 elsewhere (no (u, V) gather, no zero buffer per indexing op)."""

    @staticmethod
    def forward(ctx, x, rows, cols):
        used, local = torch.unique(rows, return_inverse=True)  # (u,), (L,)
        lse = _row_logsumexp(x.detach(), used)  # (u,)
        ctx.save_for_backward(x, used, local, rows, cols, lse)
        return x.detach()[rows, cols] - lse[local]

    @staticmethod
    def backward(ctx, grad):
        x, used, local, rows, cols, lse = ctx.saved_tensors
        per_row = torch.zeros(used.numel(), dtype=grad.dtype, device=grad.device).index_add_(0, local, grad)  # (u,)
        out = torch.zeros_like(x)
        if x.device.type == "cpu" and x.dtype == torch.float32 and grad.dtype == torch.float32:
            a, o, at = x.detach().contiguous().numpy(), out.numpy(), used.numpy()
            shift, scale = lse.numpy(), per_row.numpy()

            def one(span):
                lo, hi = span
                o[at[lo:hi]] = np.exp(a[at[lo:hi]] - shift[lo:hi, None]) * -scale[lo:hi, None]

            _run_chunks(one, _chunks(used.numel(), a.shape[1]))
        else:
            out[used] = (x.detach()[used] - lse.unsqueeze(1)).exp() * -per_row.unsqueeze(1)
        out.index_put_((rows, cols), grad.to(out.dtype), accumulate=True)
        return out, None, None


def _first_row_mass(merged: torch.Tensor, cols: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
    """Sum over groups of the first-position probability on columns ``cols``: sum exp(merged[:, cols] - scalar)."""
    if cols.numel() == 0:
        return merged.new_zeros((), dtype=torch.float64)
    if merged.device.type != "cpu" or merged.dtype != torch.float32:
        return (merged.index_select(1, cols) - scalar.unsqueeze(1)).exp().sum().double()
    a, c, sh = merged.detach().contiguous().numpy(), cols.numpy(), scalar.detach().float().numpy()
    sums = np.zeros(a.shape[0], dtype=np.float64)

    def one(span):
        lo, hi = span
        sums[lo:hi] = np.exp(a[lo:hi][:, c] - sh[lo:hi, None]).sum(axis=1)

    _run_chunks(one, _chunks(a.shape[0], int(c.size)))
    return torch.tensor(float(sums.sum()), dtype=torch.float64)


def teacher_path_from_topk(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, token_logprobs: torch.Tensor,
                           token_ids: torch.Tensor, group_ids: torch.Tensor, num_groups: int,
                           depth: int) -> TeacherPath:
    """Path of a cached top-k teacher. topk_ids, topk_logprobs: (n, K); token_logprobs, token_ids, group_ids: (n,)
    (local group ids). The actual token of a row reads ``token_logprobs`` (exact); other ids the top-K, else -inf."""
    rows, inside = _path_rows(group_ids, num_groups, depth)
    ids = torch.where(inside, token_ids.long()[rows.clamp_min(0)], -1)
    cached = topk_logprobs.detach().float().masked_fill(topk_ids < 0, -math.inf)  # (n, K)
    row_floor = cached.masked_fill(cached == -math.inf, math.inf).min(1).values  # (n,) K-th value (+inf: none)
    row_floor = torch.where(torch.isfinite(row_floor), row_floor, torch.full_like(row_floor, -math.inf))

    def lookup(at: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        hits = topk_ids[at].long() == cols.unsqueeze(1)  # (L, K)
        found = hits.any(1)
        value = cached[at].gather(1, hits.float().argmax(1, keepdim=True)).squeeze(1)
        value = torch.where(found, value, torch.full_like(value, -math.inf))
        own = token_ids[at].long() == cols
        return torch.where(own, token_logprobs[at].detach().float(), value)

    return TeacherPath(ids, rows, lookup, row_floor)


def live_pairs(path_ids: torch.Tensor, columns: ProjectionColumns) -> tuple[torch.Tensor, torch.Tensor]:
    """(L,) group and (L,) projectable-column index of every live pair (see the module docstring).

    path_ids: (G, D') actual teacher tokens at the group offsets, -1 past the end (D' >= columns.depth)."""
    groups = path_ids.shape[0]
    device = path_ids.device
    first_start = columns.first_start.to(device)
    t1 = path_ids[:, 0]  # (G,)
    t1c = t1.clamp(0, columns.teacher_vocab_size - 1)
    start = first_start[t1c]
    two_tokens = (t1 >= 0) & (path_ids[:, 1] >= 0) if path_ids.shape[1] > 1 else torch.zeros_like(t1, dtype=bool)
    count = torch.where(two_tokens, first_start[t1c + 1] - start, 0)  # (G,) n >= 2 needs two path tokens
    g_idx = torch.repeat_interleave(torch.arange(groups, device=device), count)  # (L0,)
    if g_idx.numel() == 0:
        return g_idx, g_idx
    before = torch.cumsum(count, 0) - count  # (G,) exclusive prefix sum
    p_idx = start[g_idx] + torch.arange(g_idx.numel(), device=device) - before[g_idx]
    pieces = columns.pieces.to(device)[p_idx]  # (L0, D)
    n = columns.lengths.to(device)[p_idx]  # (L0,)
    ok = torch.ones_like(g_idx, dtype=torch.bool)
    for j in range(1, columns.depth):
        on_path = path_ids[g_idx, j] if j < path_ids.shape[1] else torch.full_like(g_idx, -1)
        ok &= (j >= n) | (on_path >= 0)  # the row of offset j exists in the group
        ok &= (j >= n - 1) | (pieces[:, j] == on_path)  # every piece but the last is the actual token
    return g_idx[ok], p_idx[ok]


def projected_teacher_logprobs(path: TeacherPath, columns: ProjectionColumns, g_idx: torch.Tensor,
                               p_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L,) chain-rule teacher log-prob ``log Q`` of every live pair, and (L,) log of the upper end of its unknown
    range (prefix log-prob + the last row's smallest known log-prob; -inf when the value is known)."""
    pieces = columns.pieces.to(g_idx.device)[p_idx]  # (L, D)
    n = columns.lengths.to(g_idx.device)[p_idx]  # (L,)
    depth = columns.depth
    rows = path.rows[g_idx][:, :depth]  # (L, D)
    use = torch.arange(depth, device=g_idx.device).unsqueeze(0) < n.unsqueeze(1)  # (L, D)
    values = path.lookup(rows[use], pieces[use])  # (u,)
    per = torch.zeros(rows.shape, dtype=values.dtype, device=values.device)
    per[use] = values
    last = (n - 1).unsqueeze(1)  # (L, 1)
    last_value = per.gather(1, last).squeeze(1)  # (L,)
    prefix = per.masked_fill(torch.arange(depth, device=g_idx.device).unsqueeze(0) >= last, 0.0).sum(1)  # (L,)
    total = prefix + last_value
    unknown = torch.full_like(total, -math.inf)
    if path.row_floor is not None and total.numel():
        floor = path.row_floor[rows.gather(1, last).squeeze(1)].to(total.dtype)
        unknown = torch.where(last_value == -math.inf, prefix + floor, unknown)
    return total, unknown


def exclusive_prefix_logprobs(path: TeacherPath, columns: ProjectionColumns, g_idx: torch.Tensor, p_idx: torch.Tensor,
                              values: torch.Tensor, num_groups: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take from every student token that spells the start of the teacher's path the mass of its longer live
    extensions (see "Exclusive prefixes" in the module docstring).

    Args:
        path: the groups' teacher path; g_idx, p_idx: (L,) live pairs; values: (L,) their ``log Q``.
    Returns:
        (L,) exclusive log-values (unchanged for pairs off the path or without extensions); (G,) the share of
        the teacher's probability of the group's first path token that its 2-piece live extensions take
        (``sum_x P(x | a_0)``, in [0, 1]: what the matched column of ``a_0`` loses); (G,) that probability P(a_0).
    """
    n = columns.lengths.to(g_idx.device)[p_idx]  # (L,)
    depth = columns.depth
    q = values.detach().double().exp()  # (L,)
    # extension[g, k]: probability of the live pairs of k + 1 pieces in group g (the extensions of the k-piece prefix)
    extension = torch.zeros(num_groups, depth + 1, dtype=torch.float64, device=g_idx.device)
    extension.index_put_((g_idx, n - 1), q, accumulate=True)
    last = (n - 1).unsqueeze(1)  # (L, 1)
    pieces = columns.pieces.to(g_idx.device)[p_idx]  # (L, D)
    on_path = pieces.gather(1, last).squeeze(1) == path.ids[g_idx].gather(1, last).squeeze(1)  # (L,) a_0..a_{n-1}
    taken = torch.where(on_path, extension[g_idx, n], torch.zeros_like(q))  # (L,)
    exclusive = torch.where(taken > 0, (q - taken).clamp_min(0.0).log(), values.detach().double())
    first = path.lookup(path.rows[:, 0].clamp_min(0), path.ids[:, 0].clamp_min(0)).double().exp()  # (G,) P(a_0)
    share = torch.where(first > 0, extension[:, 1] / first.clamp_min(1e-300), torch.zeros_like(first)).clamp(0, 1)
    return exclusive.to(values.dtype), share, first


def first_piece_shift(path: TeacherPath, split: VocabSplit,
                      share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Where the teacher's matched column ``a_0`` (each group's first path token, when it is matched) loses the
    share its live extensions take: (groups (c,), a_0 (c,) teacher ids, log(1 - share) (c,)), or None. share: (G,)."""
    a0 = path.ids[:, 0]  # (G,)
    matched = (a0 >= 0) & (split.teacher_to_matched(share.device)[a0.clamp_min(0)] >= 0) & (share > 0)  # (G,)
    groups = matched.nonzero().squeeze(1)
    if groups.numel() == 0:
        return None
    return groups, a0[groups], torch.log1p(-share[groups]).clamp_min(-1e4)  # log(1 - share), finite


def _lowered_topk(teacher: TopkMerged, shift: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> TopkMerged:
    """A top-k teacher with ``first_piece_shift`` applied to its cached entries (a (G, K) copy)."""
    groups, a0, delta = shift
    hit = teacher.ids[groups].long() == a0.unsqueeze(1)  # (c, K) at most one per row
    values = teacher.logprobs.clone()
    values[groups] = values[groups] + hit * delta.unsqueeze(1).to(values.dtype)
    return TopkMerged(teacher.ids, values, teacher.tail_logprob)


# ------------------------------------------------------------------------------------------------------ loss --
def projection_loss(student_merged: torch.Tensor, teacher_merged: torch.Tensor | TopkMerged, teacher_path: TeacherPath,
                    split: VocabSplit, columns: ProjectionColumns, *, beta: float = 0.5,
                    matched_weight: float | None = None, unmatched_weight: float | None = None,
                    projected_weight: float | None = None, denominator: Denominator = None,
                    mode: UldMode = "exact", fast_k: int = DEFAULT_FAST_K, fast_tol: float | None = DEFAULT_FAST_TOL,
                    log_floor: float | None = TRL_LOG_FLOOR, exclusive: bool = True,
                    weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Projection loss (see module docstring).

    Args:
        student_merged: (G, Vs) merged student log-probs (first-position merge, temperature applied).
        teacher_merged: (G, Vt) merged teacher log-probs, or a ``TopkMerged`` (cached top-k teacher).
        teacher_path: ``teacher_path_from_logits`` / ``teacher_path_from_topk`` of the same G groups.
        split: ``VocabSplit`` of the vocab map (Vt = the FULL teacher vocabulary).
        columns: ``projection_columns`` of the projection table.
        beta: generalized-JSD beta of the matched and projected parts.
        matched_weight, unmatched_weight: as ``hybrid_loss``; projected_weight: None = the matched weight.
        denominator: valid groups of the optimizer window; None = G.
        mode, fast_k, fast_tol: ULD mode of the unmatched part. log_floor: clamp of the JSD log-values.
        exclusive: give each student token on the teacher's path only the mass its longer live extensions do not
            take ("Exclusive prefixes" in the module docstring); False = the plain chain-rule values.
        weight: multiplies the loss.
    Returns:
        loss scalar; diag: the hybrid keys plus "projected", "projected_weight", "projected_pairs",
        "teacher_mass_matched", "teacher_mass_projected", "teacher_mass_unmatched", "teacher_mass_moved" (with
        ``exclusive``: first-piece mass handed to extensions), and with a top-k teacher "projected_topk_error_bound"
        (on the returned loss).
    """
    check_2d("student_merged", student_merged)
    cached = isinstance(teacher_merged, TopkMerged)
    groups = student_merged.shape[0]
    rows = teacher_merged.ids.shape[0] if cached else teacher_merged.shape[0]
    if rows != groups or teacher_path.ids.shape[0] != groups:
        raise ValueError(f"student_merged has {groups} groups but the teacher has {rows} and its path "
                         f"{teacher_path.ids.shape[0]}; all three must describe the same groups.")
    if (columns.student_vocab_size, columns.teacher_vocab_size) != (split.student_vocab_size,
                                                                    split.teacher_vocab_size):
        raise ValueError(f"projection columns were built for (Vs, Vt)=({columns.student_vocab_size}, "
                         f"{columns.teacher_vocab_size}) but the vocab split for ({split.student_vocab_size}, "
                         f"{split.teacher_vocab_size}); build both for the same tokenizer pair.")
    denom = resolve_denominator(denominator, groups, what="projection_loss")
    w_m, w_u = hybrid_weights(split, matched_weight, unmatched_weight)
    w_p = w_m if projected_weight is None else float(projected_weight)

    g_idx, p_idx = live_pairs(teacher_path.ids, columns)  # (L,), (L,)
    s_cols = columns.student_ids.to(student_merged.device)[p_idx]  # (L,)
    t_values, unknown = projected_teacher_logprobs(teacher_path, columns, g_idx, p_idx)  # (L,), (L,)
    shift, moved = None, 0.0
    if exclusive and g_idx.numel():
        t_values, share, first = exclusive_prefix_logprobs(teacher_path, columns, g_idx, p_idx, t_values, groups)
        shift = first_piece_shift(teacher_path, split, share)
        moved = 0.0 if shift is None else float((share * first)[shift[0]].sum())  # only where a_0 is matched
    # live cells leave the student's ULD side: probability 0 entries do not change the sorted L1
    common = dict(beta=beta, matched_weight=w_m, unmatched_weight=w_u, denominator=denom, mode=mode, fast_k=fast_k,
                  log_floor=log_floor, student_dropped=(g_idx, s_cols))
    if cached:
        base, diag = hybrid_loss_topk(student_merged, teacher_merged if shift is None
                                      else _lowered_topk(teacher_merged, shift), split, **common)
    else:
        matched_shift = None if shift is None else (shift[0], split.teacher_to_matched(shift[1].device)[shift[1]],
                                                    shift[2])
        base, diag = hybrid_loss(student_merged, teacher_merged, split, fast_tol=fast_tol,
                                 teacher_matched_shift=matched_shift, **common)

    projected = student_merged.new_zeros(())
    bound = 0.0
    if g_idx.numel():
        s_values = _RowLogprobCells.apply(student_merged, g_idx, s_cols)  # (L,) log p_s(y | ctx)
        t_values = t_values.to(s_values.dtype)
        s_f, t_f = s_values, t_values
        if log_floor is not None:
            s_f, t_f = s_values.clamp_min(log_floor), t_values.clamp_min(log_floor)
        projected = generalized_jsd_terms(s_f, t_f, beta).sum() / denom
        if cached and 0.0 < beta < 1.0:
            miss = unknown > -math.inf
            t_max = unknown[miss].double().exp()
            s_miss = s_values.detach()[miss].double().exp()
            cell = torch.maximum(beta * math.log(1 / beta) * t_max, (1 - beta) * math.log(1 / (1 - beta)) * s_miss)
            bound = float(weight * w_p * cell.sum() / float(denom))

    loss = weight * (base + w_p * projected)
    with torch.no_grad():
        if cached:
            first = teacher_merged.logprobs - torch.logsumexp(teacher_merged.dense_values(), 1, keepdim=True)
            is_matched = split.teacher_to_matched(first.device)[teacher_merged.ids.long().clamp_min(0)] >= 0
            is_matched &= teacher_merged.ids >= 0
            mass_m = first.exp().masked_fill(~is_matched, 0).sum()
            mass_u = first.exp().masked_fill(is_matched | (teacher_merged.ids < 0), 0).sum()
        else:  # first-position probabilities sum to 1 per group: sum over the smaller column set only
            shift = teacher_path.scalar
            if shift is None:
                shift = _row_logsumexp(teacher_merged.detach())
            device = teacher_merged.device
            if split.num_matched <= split.teacher_unmatched.numel():
                mass_m = _first_row_mass(teacher_merged, split.teacher_matched.to(device), shift)
                mass_u = torch.clamp(groups - mass_m, min=0.0)
            else:
                mass_u = _first_row_mass(teacher_merged, split.teacher_unmatched.to(device), shift)
                mass_m = torch.clamp(groups - mass_u, min=0.0)
        mass_p = t_values.detach().double().exp().sum()
    diag.update({"projected": float(projected.detach()), "projected_weight": w_p,
                 "projected_pairs": float(g_idx.numel() / float(denom)),
                 "teacher_mass_matched": float(mass_m / float(denom)),
                 "teacher_mass_unmatched": float(mass_u / float(denom)),
                 "teacher_mass_projected": float(mass_p / float(denom)),
                 "teacher_mass_moved": moved / float(denom)})
    if cached:
        diag["projected_topk_error_bound"] = bound
    return loss, diag


# --------------------------------------------------------------------------------- chunked (training) teacher --
@dataclass
class ProjectedTeacher:
    """The teacher of one chunk of groups for ``projection_chunk_loss``: merged (G, Vt) or TopkMerged + path."""

    merged: torch.Tensor | TopkMerged
    path: TeacherPath


@dataclass
class ProjectionTeacherSide:
    """Teacher side of ``logits.chunked_merged_loss`` for the projection loss.

    inner: a ``logits.MergeSide`` (online teacher) or ``topk.TopkSide`` (cache); token_ids: (N,) actual teacher
    tokens (the top-k side does not carry them); depth: D of the projection columns.
    """

    inner: object
    token_ids: torch.Tensor
    depth: int

    @property
    def group_ids(self) -> torch.Tensor:
        return self.inner.group_ids

    def merged(self, g0: int, g1: int, strategy: MergeStrategy) -> ProjectedTeacher:
        if strategy != "first":
            raise ValueError("the projection loss needs the first-position merge (uld_token_merge_strategy='first'); "
                             f"got {strategy!r}.")
        gid = self.inner.group_ids
        idx = ((gid >= g0) & (gid < g1)).nonzero().squeeze(1)
        local, tokens = gid[idx] - g0, self.token_ids[idx]
        if hasattr(self.inner, "topk_ids"):
            side = self.inner
            merged = merged_topk(side.topk_ids[idx], side.topk_logprobs[idx], side.token_logprobs[idx], local,
                                 g1 - g0, strategy)
            path = teacher_path_from_topk(side.topk_ids[idx], side.topk_logprobs[idx], side.token_logprobs[idx],
                                          tokens, local, g1 - g0, self.depth)
            return ProjectedTeacher(merged, path)
        side = self.inner
        rows = side.rows[idx]
        logits = rows if side.head is None else side.head(rows)
        merged = merged_logprobs_from_logits(logits, tokens, local, g1 - g0, strategy, side.temperature)
        path = teacher_path_from_logits(logits, tokens, local, g1 - g0, self.depth, side.temperature, merged)
        return ProjectedTeacher(merged, path)


def projection_chunk_loss(student_merged: torch.Tensor, teacher: ProjectedTeacher, **kwargs):
    """``projection_loss`` with the chunk's ``ProjectedTeacher`` (the ``loss_fn`` of ``chunked_merged_loss``)."""
    return projection_loss(student_merged, teacher.merged, teacher.path, **kwargs)


__all__ = ["ProjectedTeacher", "ProjectionColumns", "ProjectionPair", "ProjectionTeacherSide", "TeacherPath",
           "exclusive_prefix_logprobs", "first_piece_shift", "live_pairs",
           "projected_teacher_logprobs", "projection_chunk_loss", "projection_columns", "projection_loss",
           "teacher_path_from_logits", "teacher_path_from_topk"]
