"""Cross-entropy on completion labels (``uld_crossentropy_weight``; seq_kd = this on teacher completions).

loss = weight * sum_{i: mask_i} -log softmax(logits_i / T)[labels_i] / denominator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import Denominator, check_2d, resolve_denominator, upcast

IGNORE_INDEX = -100


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, *, mask: torch.Tensor | None = None,
                       denominator: Denominator = None, temperature: float = 1.0,
                       weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Token cross-entropy summed over valid tokens and divided by an explicit denominator.

    Args:
        logits: (N, V) logits; row i predicts ``labels[i]`` (already shifted).
        labels: (N,) int token ids; ``-100`` rows are ignored.
        mask: optional (N,) bool; False rows are ignored as well.
        denominator: total valid tokens of the optimizer window; None = local count.
        temperature: divides the logits first (1.0 for plain SFT).
        weight: multiplies the loss.
    Returns:
        loss scalar; diag {"ce": loss before weight, "tokens": valid tokens}.
    """
    check_2d("logits", logits)
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (N,) with N={logits.shape[0]}; got shape {tuple(labels.shape)}.")
    keep = labels != IGNORE_INDEX
    if mask is not None:
        if mask.shape != labels.shape:
            raise ValueError(f"mask must have the shape of labels {tuple(labels.shape)}; got {tuple(mask.shape)}.")
        keep = keep & mask.bool()
    idx = keep.nonzero().squeeze(1)
    picked = upcast(logits[idx])  # (n, V)
    if temperature != 1.0:
        picked = picked / temperature
    total = F.cross_entropy(picked, labels[idx].long(), reduction="sum")
    loss = total / resolve_denominator(denominator, idx.shape[0], what="cross_entropy_loss")
    return weight * loss, {"ce": float(loss.detach()), "tokens": float(idx.shape[0])}
