"""From student logits and teacher scores to one scalar loss: `ce`, `kd` or `pg`.

Each objective is a per-token value over the completion positions, reduced with the
caller's global token count (see `opd.losses.reduce`).
"""

from __future__ import annotations

import torch

from opd.config.checks import teacher_need
from opd.config.parse import LossConfig
from opd.data.batch import SequenceBatch
from opd.losses import (
    distill_advantages,
    masked_sum,
    policy_gradient_loss,
    sparse_token_divergence,
    token_divergence,
)
from opd.modeling.hf import completion_logits, token_logprobs
from opd.objectives.base import Scored, report_divergence
from opd.teachers.base import TeacherScores


def scored_mask(batch: SequenceBatch, scores: TeacherScores | None) -> torch.Tensor:
    """`[B, L]` bool: the supervised completion positions the teacher scored (a teacher
    with another tokenizer masks what it cannot align; every one otherwise)."""
    mask = batch.loss_mask()
    if scores is not None and scores.aligned is not None:
        mask = mask & scores.aligned.to(mask.device)
    return mask


def _on(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def sampler_logprobs_of(batch: SequenceBatch, device) -> torch.Tensor | None:
    if batch.sampler_logprobs is None:
        return None
    return batch.sampler_logprobs[:, batch.prompt_width :].to(device)


def with_span_terms(
    value_BL: torch.Tensor,
    student_lp_BL: torch.Tensor,
    batch: SequenceBatch,
    scores: TeacherScores,
    loss: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kd with a teacher of another tokenizer and `cross_tokenizer.span_kd=span`: inside
    spans of several tokens (`scores.span_end >= 0`) no single-token distributions compare,
    so the value there is pg's: the span is one action, each of its student tokens takes
    the advantage log p_T(span) - log p_S(span) (discount 0, the pg ratio correction); its
    k1 estimate is logged. `value_BL` (the divergence) is kept elsewhere."""
    dev = student_lp_BL.device
    in_span = scores.span_end.to(dev).ge(0) & batch.loss_mask().to(dev)
    teacher_lp = scores.token_logprobs.to(dev)
    advantages = distill_advantages(student_lp_BL, teacher_lp, in_span, 0.0, scores.span_end)
    span = policy_gradient_loss(
        student_lp_BL,
        advantages,
        sampler_logprobs_of(batch, dev),
        loss.ratio_cap,
        loss.ratio_correction,
        loss.ratio_floor,
    )
    estimate = (student_lp_BL - teacher_lp).detach()
    return torch.where(in_span, span, value_BL), torch.where(in_span, estimate, value_BL.detach())


def per_token_loss(
    student_logits_BLV: torch.Tensor,
    batch: SequenceBatch,
    scores: TeacherScores | None,
    loss: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`([B, L] loss per token, [B, L] divergence estimate per token for logging)`."""
    ids = batch.completion_ids()
    if loss.objective == "ce":
        nll = -token_logprobs(student_logits_BLV, ids)
        return nll, nll.detach()
    params = {"beta": loss.beta, "alpha": loss.skew_alpha, "temperature": loss.kd_temperature}
    if loss.objective == "kd" and loss.estimator == "full" and scores.logits is not None:
        teacher_logits = scores.logits.to(student_logits_BLV.device)
        value = token_divergence(student_logits_BLV, teacher_logits, loss.divergence, **params)
        return value, value.detach()
    if loss.objective == "kd":  # top-k, or a full distribution mapped from another vocabulary
        value = sparse_token_divergence(
            student_logits_BLV,
            scores.topk_ids.to(student_logits_BLV.device),
            scores.topk_logprobs.to(student_logits_BLV.device),
            loss.divergence,
            **params,
            teacher_tail_logmass=_on(scores.topk_tail_logmass, student_logits_BLV.device),
        )
        if scores.span_end is not None:  # another tokenizer, span_kd=span
            student_lp = token_logprobs(student_logits_BLV, ids)
            return with_span_terms(value, student_lp, batch, scores, loss)
        return value, value.detach()
    # pg: Thinking Machines' sampled-token reverse KL as a per-token advantage.
    student_lp = token_logprobs(student_logits_BLV, ids)
    teacher_lp = scores.token_logprobs.to(student_lp.device)
    mask = scored_mask(batch, scores).to(student_lp.device)
    advantages = distill_advantages(student_lp, teacher_lp, mask, loss.discount, scores.span_end)
    value = policy_gradient_loss(
        student_lp,
        advantages,
        sampler_logprobs_of(batch, student_lp.device),
        loss.ratio_cap,
        loss.ratio_correction,
        loss.ratio_floor,
    )
    return value, (student_lp - teacher_lp).detach()  # k1 estimate of KL(S||T)


def batch_loss(
    student_logits_BLV: torch.Tensor,
    batch: SequenceBatch,
    scores: TeacherScores | None,
    loss: LossConfig,
    num_tokens: int,
    teacher=None,
) -> tuple[torch.Tensor, float]:
    """Loss of one micro-batch normalized by the step's token count, and its divergence sum
    (split by row for `teacher`, when it routes rows to several teachers)."""
    value, divergence = per_token_loss(student_logits_BLV, batch, scores, loss)
    mask = scored_mask(batch, scores).to(value.device)
    report_divergence(teacher, scores, batch, divergence, mask)
    return masked_sum(value, mask) / max(num_tokens, 1), float(masked_sum(divergence, mask))


class PlainObjective:
    """`ce`, `kd` or `pg` from the student's full `[B, L, V]` logits: the reference path."""

    def __init__(self, student, teacher, loss: LossConfig, vocab_size: int):
        self.student, self.teacher, self.config, self.vocab_size = (
            student,
            teacher,
            loss,
            vocab_size,
        )
        self.need, self.topk = teacher_need(loss)

    def score(self, batch: SequenceBatch) -> Scored:
        if self.need is None:
            return Scored(None)
        # Top-k log-probs must be tempered as the student is (kd_temperature); asked only
        # when it matters, so teachers of the older `score(batch, need, topk)` keep working.
        tempered = self.need != "token" and self.config.kd_temperature != 1.0
        kw = {"temperature": self.config.kd_temperature} if tempered else {}
        scores = self.teacher.score(batch, self.need, self.topk, **kw)
        return Scored(scores, scores.tokens_scored)

    def loss(self, batch: SequenceBatch, scored: Scored, num_tokens: int):
        logits = completion_logits(self.student, batch, self.vocab_size)
        return batch_loss(logits, batch, scored.value, self.config, num_tokens, self.teacher)
