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


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate over the whole range (Maechler 2012): log(-expm1(x))
    near 0, log1p(-exp(x)) below -log 2, where the first would round 1 - exp(x) to 1."""
    near = x > -math.log(2.0)
    # each branch is evaluated on a value where it is finite, so no gradient is NaN
    a = torch.log(-torch.expm1(torch.where(near, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near, torch.full_like(x, -1.0), x)))
    return torch.where(near, a, b)


def log_tail_mass(topk_logprobs: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """log(1 - sum(exp(topk_logprobs))) over the last dim, from reported top-k log-probs.

    `log1mexp` keeps it accurate whether the covered mass is close to 1 or small. When that mass rounds
    to 1 in the input's precision (a confident teacher: in float32 `z_max - log Z` is 0.0
    once the rest weighs less than ~1e-7), the tail is not resolved by these numbers. With
    `vocab_size` > k the mass outside the top-k is positive, so an unresolved tail reads
    as the input's resolution (its `eps`), never as empty: an empty teacher tail under a
    student tail makes reverse KL infinite. It is -inf only when the ids cover the
    vocabulary (or `vocab_size` is None). A teacher that knows its logits reports the exact
    tail instead (`TeacherScores.topk_tail_logmass`), which callers pass along.
    """
    dt = _compute_dtype(topk_logprobs)
    covered = torch.logsumexp(topk_logprobs.to(dt), dim=-1)
    resolved = (covered < 0.0) | covered.isnan()
    tail = log1mexp(torch.where(resolved, covered, torch.full_like(covered, -1.0)))
    if vocab_size is not None and topk_logprobs.shape[-1] < vocab_size:
        floor = math.log(torch.finfo(topk_logprobs.dtype).eps)
        empty = torch.full_like(tail, floor)
    else:
        empty = torch.full_like(tail, -math.inf)
    # (a NaN log-prob keeps its row NaN: reported, never silently read as a tail)
    return torch.where(resolved, tail, empty)


def bucket_tail(
    head_logprobs: torch.Tensor, tail_from_rest: torch.Tensor, pad: torch.Tensor | None = None
) -> torch.Tensor:
    """The student's tail bucket `[...]`, precise whether the tail is small or near 1.

    `tail_from_rest` is `logsumexp(logits outside the ids) - log Z`: exact when the tail is
    small, but its gradient (softmax outside the ids minus softmax) cancels when the tail
    holds nearly all the mass. There `log(1 - sum(head))`, as `log1p(-exp(logsumexp(head)))`,
    is exact instead; each is used where the other is not (the tail above or below 1/2).
    `pad`: head entries that repeat another id, left out of the sum.
    """
    head = head_logprobs
    if pad is not None:
        head = torch.where(pad, torch.full_like(head, -math.inf), head)
    empty = (head == -math.inf).all(dim=-1)
    # the branch not taken is evaluated on harmless values, so no gradient is NaN
    head_lse = torch.logsumexp(torch.where(empty[..., None], torch.zeros_like(head), head), -1)
    use_head = (head_lse < -math.log(2.0)) & ~empty
    safe = torch.where(use_head, head_lse, torch.full_like(head_lse, -1.0))
    return torch.where(use_head, log1mexp(safe), tail_from_rest)


def fold_student_to_buckets(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    temperature: float = 1.0,
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Student log-probs on the teacher's k ids plus the student's tail: `[..., k+1]`.
    `pad [..., k]`: entries that repeat another id (`padded_ids`), kept out of the tail."""
    dtype = _compute_dtype(student_logits)
    logits = student_logits.to(dtype) / temperature
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    head = logits.gather(-1, topk_ids) - log_z
    # The tail's log-mass is the log-sum-exp of the logits outside the top-k ids. Masking
    # them to -inf and reducing is exact, unlike log(1 - sum(head)) which cancels badly
    # when the tail is small (`bucket_tail` takes the other form where the tail is large).
    outside = logits.scatter(-1, topk_ids, -math.inf)
    empty = (outside == -math.inf).all(dim=-1, keepdim=True)
    # When nothing lies outside (k = V) the tail is -inf; reduce over zeros instead so the
    # backward pass of logsumexp never evaluates exp(-inf - -inf) = NaN.
    safe = torch.where(empty, torch.zeros_like(outside), outside)
    tail = torch.logsumexp(safe, dim=-1, keepdim=True) - log_z
    tail = bucket_tail(head, tail.squeeze(-1), pad).unsqueeze(-1)
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


def teacher_buckets(
    topk_logprobs: torch.Tensor,
    vocab_size: int,
    tail_logmass: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The teacher's k+1 buckets `[..., k+1]`: its top-k log-probs and its tail, as reported
    (`tail_logmass [...]`, exact) or else from the log-probs (`log_tail_mass`)."""
    head = topk_logprobs.to(dtype or _compute_dtype(topk_logprobs))
    if head.shape[-1] >= vocab_size:
        # The ids cover the whole vocabulary, so the tail is empty by construction; the
        # 1e-16 that rounding leaves in `1 - sum` must not meet the student's empty tail.
        tail = torch.full_like(head[..., 0], -math.inf)
    elif tail_logmass is not None:
        tail = tail_logmass.to(head.dtype)
    else:
        tail = log_tail_mass(topk_logprobs, vocab_size).to(head.dtype)
    return torch.cat([head, tail.unsqueeze(-1)], dim=-1)


def sparse_token_divergence(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    kind: str,
    *,
    beta: float | None = None,
    alpha: float | None = None,
    temperature: float = 1.0,
    teacher_tail_logmass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position divergence over k+1 buckets, `[..., V], [..., k], [..., k] -> [...]`.

    `teacher_topk_logprobs` are normalized log-probs over the full vocabulary (as vLLM and
    our cache return them), so their tail is implied. `temperature` applies to the student;
    the teacher's log-probs must have been computed at the same temperature (the cache
    manifest records it). `teacher_tail_logmass [...]`: the teacher's log-mass outside its
    top-k, as it reported it (exact even where the top-k log-probs round to a sum of 1);
    without it the tail is inferred from the log-probs (`log_tail_mass`).
    """
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"top-k ids {tuple(teacher_topk_ids.shape)} and log-probs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same shape"
        )
    if temperature <= 0:
        raise ValueError(f"kd_temperature must be > 0, got {temperature}")
    ids, pad = padded_ids(teacher_topk_ids)
    student_buckets = fold_student_to_buckets(student_logits, ids, temperature, pad)
    student_buckets = without_padding(student_buckets, pad)
    t_head = teacher_topk_logprobs.to(student_buckets.dtype)
    t_head = torch.where(pad, torch.full_like(t_head, -math.inf), t_head)
    teacher = teacher_buckets(
        t_head, student_logits.shape[-1], teacher_tail_logmass, student_buckets.dtype
    )
    return divergence_from_logprobs(student_buckets, teacher, kind, beta=beta, alpha=alpha)
