"""GOLD loss library: merged log-probabilities and the distillation losses, as pure tensor functions.

Dimension names: N flat completion tokens (rows of a batch concatenated), G alignment groups (global ids), Vs / Vt
student / teacher vocabularies, K cached teacher top-k, M matched vocabulary pairs, H hidden size.
``logprobs[i]`` / ``logits[i]`` always predicts completion token i (causal shift already applied).
Every loss returns ``(loss, diag)`` where ``loss = weight * sum(...) / denominator`` and ``diag`` holds floats.
"""

from .ce import cross_entropy_loss
from .hybrid import VocabSplit, hybrid_loss, hybrid_weights, matched_jsd_per_group, vocab_split
from .jsd import generalized_jsd_loss, generalized_jsd_per_token
from .logits import (
                     MergeSide,
                     chunked_merged_loss,
                     completion_hidden_states,
                     completion_logits,
                     completion_positions,
                     lm_head_logits,
)
from .merge import MERGE_STRATEGIES, group_counts, group_positions, merged_logprobs, merged_logprobs_from_logits
from .topk import (
                     TopkMerged,
                     generalized_jsd_loss_topk,
                     hybrid_loss_topk,
                     log1mexp,
                     merged_topk,
                     tail_logprob,
                     uld_loss_topk,
)
from .uld import ULD_MODES, sorted_l1, uld_loss

__all__ = [
    "MERGE_STRATEGIES", "ULD_MODES", "MergeSide", "TopkMerged", "VocabSplit", "chunked_merged_loss",
    "completion_hidden_states", "completion_logits", "completion_positions", "cross_entropy_loss",
    "generalized_jsd_loss", "generalized_jsd_loss_topk", "generalized_jsd_per_token", "group_counts",
    "group_positions", "hybrid_loss", "hybrid_loss_topk", "hybrid_weights", "lm_head_logits", "log1mexp",
    "matched_jsd_per_group", "merged_logprobs", "merged_logprobs_from_logits", "merged_topk", "sorted_l1",
    "tail_logprob", "uld_loss", "uld_loss_topk", "vocab_split",
]
