"""Masked reductions whose token count is chosen by the caller.

The mean over tokens must use the number of supervised tokens in the *whole* optimizer
step (all micro-batches, all processes), not the micro-batch's own count: otherwise a
micro-batch with few tokens weighs as much as one with many and gradient accumulation
changes the loss (the bug fixed in transformers 4.46). Callers pass that global count.
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `values` where `mask` is true. Masked entries may hold NaN or inf."""
    mask = mask.bool()
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, num_tokens: int | float | torch.Tensor | None = None
) -> torch.Tensor:
    """`masked_sum / num_tokens`; `num_tokens` defaults to this mask's own count.

    Pass the global count of supervised tokens in the optimizer step so that summing the
    results of several micro-batches gives exactly the full-batch mean.
    """
    if num_tokens is None:
        num_tokens = mask.bool().sum()
    if isinstance(num_tokens, torch.Tensor):
        denom = num_tokens.to(values.dtype).clamp(min=1)
    else:
        denom = max(float(num_tokens), 1.0)
    return masked_sum(values, mask) / denom


def sequence_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over its own unmasked positions, `[B, T] -> [B]` (GKD's 1/L_y)."""
    mask = mask_BT.bool()
    total = torch.where(mask, values_BT, torch.zeros_like(values_BT)).sum(-1)
    return total / mask.sum(-1).clamp(min=1).to(values_BT.dtype)
