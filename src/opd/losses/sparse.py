"""Divergences against a sparse teacher: top-k token log-probs plus one tail bucket.

Cached and remote teachers keep only the k most likely tokens per position (k*6 bytes
instead of 4*V). The remaining mass, `1 - sum(top-k probs)`, becomes one "tail" bucket.
The student's distribution is folded onto the same k+1 buckets (its top-k entries at the
teacher's ids, plus everything else summed), and any divergence from `divergence.py` is
taken over those buckets. With k = V the tail is empty and the result equals the full
vocabulary divergence.
"""

from __future__ import annotations

import math

import torch

from opd.losses.divergence import _compute_dtype, divergence_from_logprobs


def log_tail_mass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(topk_logprobs))) over the last dim, -inf when the top-k covers all.

    Uses log(-expm1(x)) which stays accurate when the covered mass is close to 1.
    """
    covered = torch.logsumexp(topk_logprobs, dim=-1).clamp(max=0.0)
    tail = torch.log(-torch.expm1(covered))
    return torch.where(covered < 0.0, tail, torch.full_like(tail, -math.inf))


def fold_student_to_buckets(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Student log-probs on the teacher's k ids plus the student's tail: `[..., k+1]`."""
    dtype = _compute_dtype(student_logits)
    logits = student_logits.to(dtype) / temperature
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    head = logits.gather(-1, topk_ids) - log_z
    # The tail's log-mass is the log-sum-exp of the logits outside the top-k ids. Masking
    # them to -inf and reducing is exact, unlike log(1 - sum(head)) which cancels badly.
    outside = logits.scatter(-1, topk_ids, -math.inf)
    empty = (outside == -math.inf).all(dim=-1, keepdim=True)
    # When nothing lies outside (k = V) the tail is -inf; reduce over zeros instead so the
    # backward pass of logsumexp never evaluates exp(-inf - -inf) = NaN.
    safe = torch.where(empty, torch.zeros_like(outside), outside)
    tail = torch.logsumexp(safe, dim=-1, keepdim=True) - log_z
    tail = torch.where(empty, torch.full_like(tail, -math.inf), tail)
    return torch.cat([head, tail], dim=-1)


def padded_ids(topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids with padding entries (id < 0) replaced by a real id of the same position, the
    padding mask). A teacher mapped from another vocabulary has fewer than k entries at some
    positions (`opd.teachers.cross_tokenizer.vocab_map`); a padding entry repeats an id
    already in the head, which leaves the student's tail unchanged, and both sides' head
    values there are set to -inf, so it adds nothing to any divergence."""
    ids = topk_ids.long()
    pad = ids < 0
    fill = ids.amax(dim=-1, keepdim=True).clamp(min=0).expand_as(ids)
    return torch.where(pad, fill, ids), pad


def without_padding(buckets: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Student buckets `[..., k+1]` with the padding entries' head values set to -inf."""
    if not bool(pad.any()):
        return buckets
    mask = torch.cat([pad, torch.zeros_like(pad[..., :1])], dim=-1)
    return torch.where(mask, torch.full_like(buckets, -math.inf), buckets)


def sparse_token_divergence(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    kind: str,
    *,
    beta: float | None = None,
    alpha: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence over k+1 buckets, `[..., V], [..., k], [..., k] -> [...]`.

    `teacher_topk_logprobs` are normalized log-probs over the full vocabulary (as vLLM and
    our cache return them), so their tail is implied. `temperature` applies to the student;
    the teacher's log-probs must have been computed at the same temperature (the cache
    manifest records it).
    """
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"top-k ids {tuple(teacher_topk_ids.shape)} and log-probs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same shape"
        )
    if temperature <= 0:
        raise ValueError(f"kd_temperature must be > 0, got {temperature}")
    ids, pad = padded_ids(teacher_topk_ids)
    student_buckets = fold_student_to_buckets(student_logits, ids, temperature)
    student_buckets = without_padding(student_buckets, pad)
    t_head = teacher_topk_logprobs.to(student_buckets.dtype)
    t_head = torch.where(pad, torch.full_like(t_head, -math.inf), t_head)
    t_tail = log_tail_mass(t_head).unsqueeze(-1)
    if ids.shape[-1] >= student_logits.shape[-1]:
        # The ids cover the whole vocabulary, so the tail is empty by construction; the
        # 1e-16 that rounding leaves in `1 - sum` must not meet the student's empty tail.
        t_tail = torch.full_like(t_tail, -math.inf)
    teacher_buckets = torch.cat([t_head, t_tail], dim=-1)
    return divergence_from_logprobs(student_buckets, teacher_buckets, kind, beta=beta, alpha=alpha)
