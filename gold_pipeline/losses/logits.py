"""Logits only where the loss needs them, and group-chunked losses that never hold (N, V) tensors (DESIGN §4 Memory).

* ``completion_hidden_states`` runs the decoder body once and keeps the hidden state at the position BEFORE every
  completion token (the row that predicts it): (N, H), rows of the batch concatenated in order — the same flat order
  as the completion token ids ``input_ids[completion_mask]``. The prompt never reaches the LM head.
* ``completion_logits`` applies the LM head (and Gemma-style final logit soft-capping) to those rows: (N, V).
* ``chunked_merged_loss`` goes further for long completions: it walks the groups in chunks of ``groups_per_chunk``,
  computes each chunk's student (and teacher) logits from hidden states, merges, and adds the chunk's loss sum.
  Chunks keep their activations for backward while an estimated budget (``keep_bytes``) allows, and run under
  activation checkpointing beyond it, so backward recomputes those chunks' logits instead of storing them. Peak
  memory is then O(budget + chunk tokens x V) instead of O(N x V): a 4k-token completion with a 150k vocabulary stays
  within a few GB on CPU (see bench/loss.py "chunked_4096"), while a small batch pays no recompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ._common import Denominator, resolve_denominator
from .merge import MergeStrategy, merged_logprobs_from_logits

LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
_SUMMED_DIAG = ("matched", "unmatched", "uld", "jsd", "fast_error_bound", "matched_low", "matched_high",
                "topk_error_bound", "projected", "projected_pairs", "projected_topk_error_bound",
                "teacher_mass_matched", "teacher_mass_projected", "teacher_mass_unmatched")


def completion_positions(completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool completion mask -> (N,) batch index and (N,) position of the row predicting each token."""
    if completion_mask.dim() != 2:
        raise ValueError(f"completion_mask must be (B, T); got shape {tuple(completion_mask.shape)}.")
    rows, cols = completion_mask.bool().nonzero(as_tuple=True)
    if bool((cols == 0).any()):
        b = int(rows[cols == 0][0])
        raise ValueError(f"row {b}: a completion token sits at position 0, so no logit predicts it; every completion "
                         "needs at least one prompt token (BOS or the chat template) before it.")
    return rows, cols - 1


def lm_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """(n, H) final hidden states -> (n, V) logits with the model's LM head (+ final logit soft-capping if set)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def completion_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                             completion_mask: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """Decoder hidden states at the positions predicting completion tokens.

    Args:
        model: a transformers causal LM (``get_decoder()`` + ``get_output_embeddings()``).
        input_ids: (B, T) prompt + completion ids; attention_mask: (B, T) or None.
        completion_mask: (B, T) bool, True at completion tokens (the flat order is ``input_ids[completion_mask]``).
    Returns:
        (N, H) hidden states; row i predicts the i-th completion token.
    """
    body = model.get_decoder()
    out = body(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, H)
    rows, cols = completion_positions(completion_mask)
    return hidden[rows, cols]  # (N, H)


def completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      completion_mask: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """(N, V) logits at completion positions only (hidden states sliced before the LM head)."""
    return lm_head_logits(model, completion_hidden_states(model, input_ids, attention_mask, completion_mask,
                                                          **forward_kwargs))


@dataclass
class MergeSide:
    """One side of a chunked merged loss.

    rows: (N, H) hidden states with ``head`` mapping (n, H) -> (n, V), or (N, V) logits with ``head=None``.
    token_ids: (N,) actual completion tokens; group_ids: (N,) global group ids (-1 = excluded).
    temperature: divides the logits first.
    """

    rows: torch.Tensor
    token_ids: torch.Tensor
    group_ids: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    temperature: float = 1.0

    def width(self) -> int:
        """V, the vocabulary width of this side's logits (one-row probe of the head)."""
        if self.head is None:
            return int(self.rows.shape[1])
        with torch.no_grad():
            return int(self.head(self.rows[:1]).shape[-1])

    def merged(self, g0: int, g1: int, strategy: MergeStrategy) -> torch.Tensor:
        """(g1 - g0, V) merged log-probabilities of groups [g0, g1)."""
        idx = ((self.group_ids >= g0) & (self.group_ids < g1)).nonzero().squeeze(1)
        rows = self.rows[idx]
        logits = rows if self.head is None else self.head(rows)
        return merged_logprobs_from_logits(logits, self.token_ids[idx], self.group_ids[idx] - g0, g1 - g0, strategy,
                                           self.temperature)


def chunked_merged_loss(student: MergeSide, teacher: MergeSide, num_groups: int, loss_fn: LossFn, *,
                        denominator: Denominator = None, strategy: MergeStrategy = "first",
                        groups_per_chunk: int = 64, checkpoint_chunks: bool = True, keep_bytes: int = 0,
                        teacher_grad: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Merged-distribution loss computed chunk by chunk over groups.

    Args:
        student, teacher: ``MergeSide`` (hidden states + head, or logits); the teacher may also be a cached top-k
            ``topk.TopkSide`` (its ``merged`` gives a ``TopkMerged`` for a ``*_loss_topk`` loss_fn).
        num_groups: G (global group ids 0..G-1 on both sides).
        loss_fn: ``loss_fn(student_merged (g, Vs), teacher_merged (g, Vt), denominator=1.0) -> (loss_sum, diag)``,
            e.g. ``functools.partial(hybrid_loss, vocab_map=split, beta=0.5)`` or ``uld_loss``; it must return the
            chunk's SUM (it is called with denominator 1).
        denominator: valid groups of the optimizer window; None = ``num_groups``.
        groups_per_chunk: groups per chunk (memory ~ chunk tokens x V x ~12 bytes).
        checkpoint_chunks: recompute chunks in backward (True) instead of keeping their activations.
        keep_bytes: with checkpoint_chunks, chunks keep their activations (no recompute) while the estimated kept
            bytes of all kept chunks stay within this budget; the rest are recomputed. The estimate per chunk is
            4 bytes x Vs x (2 x its student tokens + 3 x its groups): the student log-softmax and merged rows and
            the loss's saved gradients. 0 = checkpoint every chunk.
        teacher_grad: the teacher side needs gradients (normally False: teacher computed under no_grad).
    Returns:
        (loss, diag) with loss = sum over chunks / denominator; diag sums the chunk diagnostics in
        ("matched", "unmatched", "uld", "jsd", "fast_error_bound") divided by the denominator, plus "groups",
        "chunks", "student_excluded_tokens", "teacher_excluded_tokens" (group id -1).
    """
    if groups_per_chunk < 1:
        raise ValueError(f"groups_per_chunk must be >= 1 (got {groups_per_chunk}).")
    denom = resolve_denominator(denominator, num_groups, what="chunked_merged_loss")
    totals: dict[str, float] = {}
    extra: dict[str, float] = {}

    def run(g0: int, g1: int, record: bool) -> torch.Tensor:
        with torch.set_grad_enabled(teacher_grad and torch.is_grad_enabled()):
            t_m = teacher.merged(g0, g1, strategy)
        s_m = student.merged(g0, g1, strategy)
        loss, diag = loss_fn(s_m, t_m, denominator=1.0)
        if record:
            for key, value in diag.items():
                if key in _SUMMED_DIAG:
                    totals[key] = totals.get(key, 0.0) + value
                else:
                    extra[key] = value
        return loss

    total = None
    spans = [(g, min(g + groups_per_chunk, num_groups)) for g in range(0, num_groups, groups_per_chunk)]
    kept, recomputed = 0, 0
    per_token = per_group = 0
    if checkpoint_chunks and keep_bytes > 0 and spans:
        width = student.width()
        per_token, per_group = 8 * width, 12 * width
    for g0, g1 in spans:
        cost = (per_token * int(((student.group_ids >= g0) & (student.group_ids < g1)).sum())
                + per_group * (g1 - g0))
        if per_group and kept + cost <= keep_bytes:
            kept += cost
            part = run(g0, g1, True)
        elif checkpoint_chunks and torch.is_grad_enabled():
            recomputed += 1
            first = [True]

            def chunk(_anchor, g0=g0, g1=g1, first=first):
                record, first[0] = first[0], False  # record diagnostics on the forward pass only
                return run(g0, g1, record)

            part = checkpoint(chunk, student.rows, use_reentrant=False)
        else:
            part = run(g0, g1, True)
        total = part if total is None else total + part
    if total is None:
        total = student.rows.sum() * 0.0
    loss = total / denom
    diag = {key: value / float(denom) for key, value in totals.items()}
    diag.update({k: v for k, v in extra.items() if k.endswith("_weight") or k == "matched_columns"})
    diag.update({"groups": float(num_groups), "chunks": float(len(spans)), "recomputed_chunks": float(recomputed),
                 "student_excluded_tokens": float(int((student.group_ids < 0).sum())),
                 "teacher_excluded_tokens": float(int((teacher.group_ids < 0).sum()))})
    return loss, diag
