"""Collation: a slice of aligned rows -> padded model inputs + FLAT completion tensors with global group ids.

A *row* is a plain dict with the aligned-shard columns (DESIGN §5):
  sample_id, completion_text, student_prompt_ids, student_completion_ids, teacher_prompt_ids,
  teacher_completion_ids, student_group_ids, teacher_group_ids (+ optional teacher_topk_ids/logprobs)
and a few training-only keys: `stopped` (the completion ends with end-of-turn ids on both sides).

The DataLoader yields lists of rows (identity collate); the trainer builds the optimizer window from them
(on-policy rows replace off-policy ones) and only then calls `collate_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gold_pipeline.align.row import global_group_ids
from gold_pipeline.data.ragged import flatten
from gold_pipeline.text.pair import TokenizerPair

TOPK_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_token_logprobs")


def ends_with(ids: Sequence[int], suffix: Sequence[int]) -> bool:
    return len(suffix) > 0 and len(ids) >= len(suffix) and list(ids[len(ids) - len(suffix) :]) == list(suffix)


def utf8_bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


def identity_collate(rows: list[dict]) -> list[dict]:
    return rows


def stop_group_rows(rows: list[dict], pair: TokenizerPair) -> list[dict]:
    """Give the end-of-turn tokens of rows that end with them on both sides one extra aligned group
    (used when uld_skip_student_eos = uld_skip_teacher_eos = False)."""
    out = []
    for row in rows:
        s_ids, t_ids = row["student_completion_ids"], row["teacher_completion_ids"]
        if ends_with(s_ids, pair.student_eot_ids) and ends_with(t_ids, pair.teacher_eot_ids):
            row = dict(row)
            g = int(row.get("num_groups", max(row["student_group_ids"] + [-1]) + 1))
            ns, nt = len(pair.student_eot_ids), len(pair.teacher_eot_ids)
            row["student_group_ids"] = list(row["student_group_ids"][:-ns]) + [g] * ns
            row["teacher_group_ids"] = list(row["teacher_group_ids"][:-nt]) + [g] * nt
            row["num_groups"] = g + 1
        out.append(row)
    return out


def _side_inputs(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded to a common width P, completions right-padded to L: every row's completion starts
    at column P, so logits at columns P-1 .. P+L-2 predict the completion tokens of all rows."""
    B = len(prompts)
    P = max(len(p) for p in prompts)
    L = max(max((len(c) for c in completions), default=0), 1)
    input_ids = torch.full((B, P + L), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, P + L), dtype=torch.long)
    completion_mask = torch.zeros((B, L), dtype=torch.bool)  # (B, L)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[b, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attention_mask[b, P - len(p) : P] = 1
        if c:
            input_ids[b, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
            attention_mask[b, P : P + len(c)] = 1
            completion_mask[b, : len(c)] = True
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)  # (B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "completion_mask": completion_mask,
        "prompt_width": torch.tensor(P),
    }


def _flat_groups(rows: list[dict], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) token ids and (N,) global group ids of one side: row offsets added, -1 kept."""
    ids, starts = flatten([row[f"{side}_completion_ids"] for row in rows])  # (N,), (B+1,)
    groups, _ = flatten([row[f"{side}_group_ids"] for row in rows])
    num_groups = np.fromiter((int(row["num_groups"]) for row in rows), dtype=np.int64, count=len(rows))
    return torch.from_numpy(ids), torch.from_numpy(global_group_ids(groups, starts, num_groups))


def collate_rows(rows: list[dict], pair: TokenizerPair) -> dict[str, Any]:
    """One micro-batch: student_*/teacher_* padded inputs, flat completion ids and global group ids.

    Keys (B rows, Ts/Tt sequence lengths, Ns/Nt flat completion tokens, G groups):
      input_ids, attention_mask, position_ids (B, Ts); completion_mask (B, Ls); prompt_width
      teacher_input_ids, teacher_attention_mask, teacher_position_ids (B, Tt); teacher_completion_mask (B, Lt)
      student_token_ids, student_group_ids (Ns,); teacher_token_ids, teacher_group_ids (Nt,); num_groups (G)
      teacher_topk_ids, teacher_topk_logprobs (Nt, K) when every row carries them
      completion_bytes (B,); rows (the rows themselves, for logging)
    """
    for row in rows:
        if "num_groups" not in row:
            row["num_groups"] = max(list(row["student_group_ids"]) + [-1]) + 1
    student = _side_inputs([r["student_prompt_ids"] for r in rows], [r["student_completion_ids"] for r in rows],
                           pair.student_pad_id)
    teacher = _side_inputs([r["teacher_prompt_ids"] for r in rows], [r["teacher_completion_ids"] for r in rows],
                           pair.teacher_pad_id)
    student_token_ids, student_group_ids = _flat_groups(rows, "student")
    teacher_token_ids, teacher_group_ids = _flat_groups(rows, "teacher")
    batch: dict[str, Any] = dict(student)
    batch.update({f"teacher_{k}": v for k, v in teacher.items()})
    batch.update(
        student_token_ids=student_token_ids,
        student_group_ids=student_group_ids,
        teacher_token_ids=teacher_token_ids,
        teacher_group_ids=teacher_group_ids,
        num_groups=torch.tensor(sum(int(r["num_groups"]) for r in rows)),
        completion_bytes=torch.tensor([len(utf8_bytes(r["completion_text"])) for r in rows]),
        rows=rows,
    )
    if rows and all(r.get(c) is not None for r in rows for c in TOPK_COLUMNS):
        K = max((len(r["teacher_topk_ids"][0]) for r in rows if len(r["teacher_topk_ids"])), default=0)

        def flat(name: str, dtype) -> np.ndarray:  # rows' (n_r, K) or (n_r,) values stacked: (Nt, K) or (Nt,)
            parts = [np.asarray(r[name], dtype=dtype) for r in rows]
            return np.concatenate([p.reshape(-1, K) if name != "teacher_token_logprobs" else p for p in parts])

        batch["teacher_topk_ids"] = torch.from_numpy(flat("teacher_topk_ids", np.int64))  # (Nt, K)
        batch["teacher_topk_logprobs"] = torch.from_numpy(flat("teacher_topk_logprobs", np.float32))  # (Nt, K)
        batch["teacher_token_logprobs"] = torch.from_numpy(flat("teacher_token_logprobs", np.float32))  # (Nt,)
    return batch
