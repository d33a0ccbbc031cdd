"""The GOLD loss step: completion-only logits of student and teacher, merge, loss, window normalization.

Pure functions over one collated micro-batch (see data.collate_rows). Every loss term is a SUM over the
micro-batch divided by the count of the whole optimizer window (all accumulation steps, all processes), so
summing micro-batch losses over the window gives the window mean (DESIGN §4).

Dims: B rows, Ts/Tt sequence, Ls/Lt padded completion length, Ns/Nt flat completion tokens, G groups,
Vs/Vt vocabularies, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gold_pipeline import losses as L
from gold_pipeline.losses.projection import ProjectionTeacherSide, projection_chunk_loss
from gold_pipeline.losses.topk import TopkSide, generalized_jsd_loss_topk, hybrid_loss_topk, uld_loss_topk

# Window counts: the denominators of the loss terms, summed over the window and all processes.
WINDOW_KEYS = ("groups", "tokens", "seqkd_tokens")


@dataclass(frozen=True)
class LossSettings:
    """Hyperparameters of the loss step (from GOLDConfig)."""

    use_uld_loss: bool
    use_hybrid_loss: bool
    beta: float
    temperature: float  # generalized JSD (same tokenizer)
    student_temperature: float
    teacher_temperature: float
    merge_strategy: str
    uld_loss_mode: str
    matched_weight: float | None
    unmatched_weight: float | None
    crossentropy_weight: float
    distillation_weight: float
    student_vocab_size: int
    teacher_vocab_size: int
    groups_per_chunk: int = 64
    checkpoint_chunks: bool = True
    keep_bytes: int = 0
    use_projection_loss: bool = False
    projected_weight: float | None = None
    projection_exclusive: bool = True

    @classmethod
    def from_args(cls, args, student_vocab_size: int, teacher_vocab_size: int) -> LossSettings:
        return cls(
            use_uld_loss=args.use_uld_loss,
            use_hybrid_loss=args.uld_use_hybrid_loss,
            beta=args.beta,
            temperature=args.temperature,
            student_temperature=args.uld_student_temperature,
            teacher_temperature=args.uld_teacher_temperature,
            merge_strategy=args.uld_token_merge_strategy,
            uld_loss_mode=args.uld_loss_mode,
            matched_weight=args.uld_hybrid_matched_weight,
            unmatched_weight=args.uld_hybrid_unmatched_weight,
            crossentropy_weight=args.uld_crossentropy_weight,
            distillation_weight=args.uld_distillation_weight,
            student_vocab_size=student_vocab_size,
            teacher_vocab_size=teacher_vocab_size,
            groups_per_chunk=args.uld_groups_per_chunk,
            checkpoint_chunks=args.uld_checkpoint_chunks,
            keep_bytes=int(args.uld_keep_activations_mb * 2**20),
            use_projection_loss=args.uld_use_projection_loss,
            projected_weight=args.uld_projection_weight,
            projection_exclusive=args.uld_projection_exclusive,
        )


# ----------------------------------------------------------------------------------------------------------
# Completion-only logits.
# ----------------------------------------------------------------------------------------------------------


def completion_positions(batch: dict, prefix: str = "") -> torch.Tensor:
    """(L,) sequence columns whose logits predict the completion tokens (same for every row, see collate)."""
    width = int(batch[f"{prefix}prompt_width"])
    length = batch[f"{prefix}completion_mask"].shape[1]
    return torch.arange(width - 1, width - 1 + length, device=batch[f"{prefix}input_ids"].device)


def forward_completion_logits(model, batch: dict, *, prefix: str = "", vocab_size: int | None = None) -> torch.Tensor:
    """(N, V) logits at the completion positions only, rows concatenated.

    Goes through `model(...)` itself (so DDP/FSDP/DeepSpeed wrappers and peft see the forward) and asks for
    the LM head only at the completion columns (`logits_to_keep`), so no (B, T, V) tensor is built for the
    prompt. Columns past `vocab_size` (embedding padding) are dropped: they are not tokens.
    """
    positions = completion_positions(batch, prefix)  # (L,)
    outputs = model(
        input_ids=batch[f"{prefix}input_ids"],
        attention_mask=batch[f"{prefix}attention_mask"],
        position_ids=batch[f"{prefix}position_ids"],
        logits_to_keep=positions,
        use_cache=False,
    )
    logits = outputs.logits  # (B, L, V)
    if vocab_size is not None and logits.shape[-1] > vocab_size:
        logits = logits[..., :vocab_size]
    return logits[batch[f"{prefix}completion_mask"]]  # (N, V)


@dataclass
class CompletionRows:
    """Completion-position hidden states (N, H) plus the LM head (n, H) -> (n, V): logits are made per chunk
    inside the chunked merged loss instead of all at once. Only for models that are not wrapped (DDP/FSDP
    need the forward through the wrapper): the teacher always, the student in single-process runs."""

    hidden: torch.Tensor
    head: Any


def forward_completion_rows(model, batch: dict, *, prefix: str = "", vocab_size: int | None = None) -> CompletionRows:
    """(N, H) hidden states at the rows predicting the completion tokens, and the LM head cut to `vocab_size`."""
    from gold_pipeline.losses.logits import completion_hidden_states, lm_head_logits

    input_ids = batch[f"{prefix}input_ids"]  # (B, T)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)  # (B, T) True at completion tokens
    width = int(batch[f"{prefix}prompt_width"])
    mask[:, width : width + batch[f"{prefix}completion_mask"].shape[1]] = batch[f"{prefix}completion_mask"]
    hidden = completion_hidden_states(model, input_ids, batch[f"{prefix}attention_mask"], mask,
                                      position_ids=batch[f"{prefix}position_ids"], use_cache=False)  # (N, H)

    def head(rows: torch.Tensor) -> torch.Tensor:
        logits = lm_head_logits(model, rows)  # (n, V)
        return logits[:, :vocab_size] if vocab_size is not None and logits.shape[1] > vocab_size else logits

    return CompletionRows(hidden, head)


def as_logits(side: torch.Tensor | CompletionRows) -> torch.Tensor:
    return side.head(side.hidden) if isinstance(side, CompletionRows) else side


# ----------------------------------------------------------------------------------------------------------
# The loss of one micro-batch.
# ----------------------------------------------------------------------------------------------------------


def window_counts(batch: dict, *, seq_kd: bool, use_uld_loss: bool) -> dict[str, int]:
    """This micro-batch's contribution to the window denominators."""
    groups = int(batch["num_groups"]) if use_uld_loss else int(batch["student_token_ids"].shape[0])
    tokens = int(batch["student_token_ids"].shape[0])
    if seq_kd:
        return {"groups": 0, "tokens": 0, "seqkd_tokens": tokens}
    return {"groups": groups, "tokens": tokens, "seqkd_tokens": 0}


def _denominator(window: dict[str, Any] | None, key: str, local: int):
    """The window's total count for `key`; None (the loss then uses the local count) when there is no window
    (evaluation) or the window counted nothing (then `local` is 0 as well and the loss is 0)."""
    if window is None or float(window[key]) <= 0:
        return None
    return window[key]


def seq_kd_loss(student_logits: torch.Tensor, batch: dict, window: dict | None) -> tuple[torch.Tensor, dict]:
    """Sequence-level KD: cross-entropy of the student on a teacher-generated completion. (Ns, Vs) logits."""
    labels = batch["student_token_ids"]  # (Ns,)
    mask = torch.ones_like(labels, dtype=torch.bool)
    loss, diag = L.cross_entropy_loss(student_logits, labels, mask=mask,
                                      denominator=_denominator(window, "seqkd_tokens", labels.numel()))
    return loss, {"seq_kd_loss": loss.detach(), **_prefixed("seq_kd", diag)}


def distillation_loss(
    student_logits: torch.Tensor | CompletionRows,
    teacher: dict[str, torch.Tensor],
    batch: dict,
    settings: LossSettings,
    window: dict | None,
    vocab_map: torch.Tensor | None,
) -> tuple[torch.Tensor, dict]:
    """The GOLD loss of one micro-batch.

    student_logits: (Ns, Vs) logits or CompletionRows (hidden + head).
    teacher: {"rows": CompletionRows} or {"logits": (Nt, Vt)} from the teacher model, or
    {"topk_ids": (Nt, K), "topk_logprobs": (Nt, K), "token_logprobs": (Nt,)} from the cache.
    """
    parts: dict[str, torch.Tensor] = {}
    s_ids = batch["student_token_ids"]
    G = int(batch["num_groups"])

    chunked = settings.use_uld_loss and G > 0 and settings.distillation_weight != 0
    if not chunked:  # the other paths take full logits
        student_logits = as_logits(student_logits)
        if "rows" in teacher:
            teacher = {"logits": as_logits(teacher["rows"])}
    if settings.distillation_weight == 0 or (settings.use_uld_loss and G == 0):
        # weight 0 (cross-entropy only, e.g. seq_kd): the term is not computed; G == 0: nothing aligned in this
        # micro-batch (e.g. a garbage sample)
        distill, diag = _rows(student_logits).sum() * 0.0, {}
    elif chunked:
        denominator = _denominator(window, "groups", G)
        distill, diag = _chunked_merged_loss(student_logits, teacher, batch, settings, denominator, vocab_map)
    else:
        mask = torch.ones_like(s_ids, dtype=torch.bool)
        denominator = _denominator(window, "groups", s_ids.numel())
        if "logits" in teacher:
            distill, diag = L.generalized_jsd_loss(
                student_logits, teacher["logits"], beta=settings.beta, temperature=settings.temperature,
                mask=mask, denominator=denominator,
            )
        else:
            distill, diag = generalized_jsd_loss_topk(
                student_logits, teacher["topk_ids"], teacher["topk_logprobs"], beta=settings.beta,
                temperature=settings.temperature, mask=mask, denominator=denominator,
            )
    loss = settings.distillation_weight * distill
    parts["distillation_loss"] = distill.detach()
    parts.update(_prefixed("distill", diag))
    if settings.crossentropy_weight > 0:
        mask = torch.ones_like(s_ids, dtype=torch.bool)
        ce, _ = L.cross_entropy_loss(as_logits(student_logits), s_ids, mask=mask,
                                     denominator=_denominator(window, "tokens", s_ids.numel()))
        loss = loss + settings.crossentropy_weight * ce
        parts["crossentropy_loss"] = ce.detach()
    return loss, parts


def _chunked_merged_loss(student_logits, teacher: dict, batch, settings: LossSettings, denominator, vocab_map):
    """Merge + ULD/hybrid over chunks of `groups_per_chunk` groups, so the (G, V) temporaries of the merge and
    the sort exist for one chunk at a time (chunks past the activation budget are recomputed in backward). The
    teacher side is the teacher model's rows/logits or the cached top-K (then merged per chunk by `TopkSide`)."""
    from functools import partial

    from gold_pipeline.losses.logits import MergeSide, chunked_merged_loss

    cached = "topk_ids" in teacher
    if settings.use_projection_loss:  # vocab_map is a ProjectionPair (trainer._vocab_map)
        loss_fn = partial(projection_chunk_loss, split=vocab_map.split, columns=vocab_map.columns, beta=settings.beta,
                          matched_weight=settings.matched_weight, unmatched_weight=settings.unmatched_weight,
                          projected_weight=settings.projected_weight, mode=settings.uld_loss_mode,
                          exclusive=settings.projection_exclusive)
    elif settings.use_hybrid_loss:
        loss_fn = partial(hybrid_loss_topk if cached else L.hybrid_loss, vocab_map=vocab_map, beta=settings.beta,
                          matched_weight=settings.matched_weight, unmatched_weight=settings.unmatched_weight,
                          mode=settings.uld_loss_mode)
    elif cached:
        loss_fn = partial(uld_loss_topk, teacher_vocab_size=settings.teacher_vocab_size, mode=settings.uld_loss_mode)
    else:
        loss_fn = partial(L.uld_loss, mode=settings.uld_loss_mode)

    def side(rows, prefix: str, temperature: float) -> MergeSide:
        if isinstance(rows, CompletionRows):  # (N, H) + head: logits made per chunk
            return MergeSide(rows.hidden, batch[f"{prefix}_token_ids"], batch[f"{prefix}_group_ids"], head=rows.head,
                             temperature=temperature)
        return MergeSide(rows, batch[f"{prefix}_token_ids"], batch[f"{prefix}_group_ids"], temperature=temperature)

    student = side(student_logits, "student", settings.student_temperature)
    if cached:  # log-probs cached at the training temperature
        teacher_side = TopkSide(teacher["topk_ids"], teacher["topk_logprobs"], teacher["token_logprobs"],
                                batch["teacher_group_ids"])
    else:
        teacher_side = side(teacher.get("rows", teacher.get("logits")), "teacher", settings.teacher_temperature)
    if settings.use_projection_loss:  # the same teacher, plus its token path for the chain rule
        teacher_side = ProjectionTeacherSide(teacher_side, batch["teacher_token_ids"], vocab_map.columns.depth)
    return chunked_merged_loss(student, teacher_side, int(batch["num_groups"]), loss_fn, denominator=denominator,
                               strategy=settings.merge_strategy, groups_per_chunk=settings.groups_per_chunk,
                               checkpoint_chunks=settings.checkpoint_chunks, keep_bytes=settings.keep_bytes)


def _rows(side: torch.Tensor | CompletionRows) -> torch.Tensor:
    return side.hidden if isinstance(side, CompletionRows) else side


def _prefixed(prefix: str, diag: dict) -> dict:
    out = {}
    for key, value in (diag or {}).items():
        if torch.is_tensor(value) and value.numel() == 1:
            out[f"{prefix}/{key}"] = value.detach().float()
        elif isinstance(value, (int, float)):
            out[f"{prefix}/{key}"] = torch.tensor(float(value))
    return out


def student_nats(student_logits: torch.Tensor, batch: dict, student_eot_ids: list[int]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood (nats) of the completion text tokens (end-of-turn ids left out: they
    carry no bytes), for bits-per-byte = sum nats / (ln 2 * sum bytes). Returns (nats, counted tokens)."""
    from gold_pipeline.training.collate import ends_with

    logprobs = torch.log_softmax(student_logits.float(), dim=-1)  # (Ns, Vs)
    token_logprobs = logprobs.gather(1, batch["student_token_ids"].unsqueeze(1)).squeeze(1)  # (Ns,)
    keep = torch.ones_like(token_logprobs, dtype=torch.bool)
    offset, n_eot = 0, len(student_eot_ids)
    for row in batch["rows"]:
        n = len(row["student_completion_ids"])
        if ends_with(row["student_completion_ids"], student_eot_ids):
            keep[offset + n - n_eot : offset + n] = False
        offset += n
    return -(token_logprobs[keep]).sum(), int(keep.sum())
