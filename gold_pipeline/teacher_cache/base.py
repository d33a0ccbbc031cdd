"""What every teacher backend takes and returns, and the small pure helpers they share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TeacherRequest:
    """One completion to produce (or, score-only, to score)."""

    sample_id: str
    prompt_ids: list[int]                       # teacher chat template, add_generation_prompt=True
    seed: int                                   # per-sample seed (from the run seed and sample_id)
    completion_ids: list[int] | None = None     # score-only: the ids to score (ends with end-of-turn ids)
    prompt_text: str | None = None              # the rendered prompt (servers that only take text)


@dataclass
class TeacherResult:
    """One completion with its teacher log-probs; m = completion tokens, K = top-k."""

    completion_ids: list[int]                   # (m,) ends with the stop id when finish_reason == "stop"
    finish_reason: str                          # "stop" | "length"
    token_logprobs: np.ndarray | None = None    # (m,) float32 log-prob of each completion id
    topk_ids: np.ndarray | None = None          # (m, K) int32, most likely first
    topk_logprobs: np.ndarray | None = None     # (m, K) float32, descending
    completion_text: str | None = None          # the backend's own text (servers); None -> decode ids
    stats: dict = field(default_factory=dict)   # per-result counters merged into the run stats


def topk_from_logprobs(logprobs: torch.Tensor, completion_ids: torch.Tensor, k: int):
    """Actual-token log-probs and top-k of rows of log-probs.

    logprobs: (N, V) float32 normalized log-probs; completion_ids: (N,) -> ((N,), (N, K) ids, (N, K) log-probs)
    """
    token_logprobs = logprobs.gather(-1, completion_ids[:, None].long()).squeeze(-1)   # (N,)
    if k == 0:
        return token_logprobs, None, None
    values, indices = torch.topk(logprobs, k, dim=-1, largest=True, sorted=True)      # (N, K)
    return token_logprobs, indices.to(torch.int32), values
