"""`ce`, `pg` and top-k `kd` from the student's hidden states: the student side of every
objective whose teacher returns a few numbers per position (cached, remote, vLLM, or a
local model scoring tokens), never forming the student's `[tokens, vocab]` logits.

Each is the per-token value of `opd.objectives.plain.per_token_loss`, with the student's
log-probs from `opd.losses.fused_sampled` (tiles over the vocabulary) instead of a
log-softmax over full logits; tested equal, values and gradients.
"""

from __future__ import annotations

import torch

from opd.config.parse import LossConfig
from opd.data.batch import SequenceBatch
from opd.losses import (
    distill_advantages,
    fused_sparse_token_divergence,
    fused_token_logprobs,
    policy_gradient_loss,
)
from opd.modeling.hf import lm_head
from opd.modeling.wrapped import as_forward
from opd.objectives.base import Scored, TokenTerms, report_divergence
from opd.objectives.fused import supervised_hidden
from opd.objectives.plain import (
    PlainObjective,
    sampler_logprobs_of,
    scored_mask,
    with_span_terms,
)
from opd.teachers.base import TeacherScores


def _on_grid(values_N: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Per-row values `[N]` placed at the mask's cells of a zero `[B, L]` grid (differentiable)."""
    rows, cols = mask_BL.nonzero(as_tuple=True)
    grid = values_N.new_zeros(mask_BL.shape)
    return grid.index_put((rows, cols), values_N)


def fused_per_token_loss(
    hidden_NH: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor | None],
    batch: SequenceBatch,
    scores: TeacherScores | None,
    loss: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`([N] loss, [N] divergence estimate)` at `batch.loss_mask()`'s cells (row-major), from
    the student's hidden states there; the values of `plain.per_token_loss` at those cells."""
    weight, bias = head
    mask = batch.loss_mask().to(hidden_NH.device)
    # A teacher with another tokenizer scores some positions only: the others count zero.
    scored = scored_mask(batch, scores).to(hidden_NH.device) if scores is not None else mask
    ids = batch.completion_ids().to(hidden_NH.device)[mask]
    if loss.objective == "ce":
        nll = -fused_token_logprobs(hidden_NH, weight, ids, head_bias=bias)
        return nll, nll.detach()
    if loss.objective == "kd":  # top-k + tail buckets (full vocabulary is `FusedObjective`)
        tail = scores.topk_tail_logmass
        value = fused_sparse_token_divergence(
            hidden_NH,
            weight,
            scores.topk_ids.to(hidden_NH.device)[mask],
            scores.topk_logprobs.to(hidden_NH.device)[mask],
            loss.divergence,
            beta=loss.beta,
            alpha=loss.skew_alpha,
            kd_temperature=loss.kd_temperature,
            student_head_bias=bias,
            teacher_tail_logmass=None if tail is None else tail.to(hidden_NH.device)[mask],
        )
        if scores.aligned is not None:
            value = torch.where(scored[mask], value, torch.zeros_like(value))
        if scores.span_end is not None:  # another tokenizer, span_kd=span
            student_lp = fused_token_logprobs(hidden_NH, weight, ids, head_bias=bias)
            value, estimate = with_span_terms(
                _on_grid(value, mask), _on_grid(student_lp, mask), batch, scores, loss
            )
            return value[mask], estimate[mask]
        return value, value.detach()
    # pg: advantages (discounted along each row) and importance ratios live on the grid.
    student_lp = _on_grid(fused_token_logprobs(hidden_NH, weight, ids, head_bias=bias), mask)
    teacher_lp = scores.token_logprobs.to(student_lp.device)
    advantages = distill_advantages(student_lp, teacher_lp, scored, loss.discount, scores.span_end)
    value = policy_gradient_loss(
        student_lp,
        advantages,
        sampler_logprobs_of(batch, student_lp.device),
        loss.ratio_cap,
        loss.ratio_correction,
        loss.ratio_floor,
    )
    divergence = torch.where(scored, student_lp - teacher_lp, torch.zeros_like(student_lp))
    return value[mask], divergence.detach()[mask]


class FusedTokenObjective:
    """`ce`, `pg` or top-k `kd` with any teacher, the student's side from hidden states."""

    def __init__(self, student, teacher, loss: LossConfig, vocab_size: int):
        self.student, self.teacher, self.config = student, teacher, loss
        self.vocab_size = vocab_size
        # The teacher's side is the plain objective's: same request, same scores.
        self.plain = PlainObjective(student, teacher, loss, vocab_size)

    def score(self, batch: SequenceBatch) -> Scored:
        return self.plain.score(batch)

    def token_terms(
        self, batch: SequenceBatch, scores, *, distill: bool = True, logprobs: bool = False
    ) -> TokenTerms:
        """The distillation loss and/or the student's log-probs at the supervised cells,
        computed as the student's forward (inside any DDP/FSDP wrapper)."""

        def terms(model) -> TokenTerms:
            hidden = supervised_hidden(model, batch, self.config.fused_forward)
            weight, bias = head = lm_head(model, self.vocab_size)
            out = TokenTerms()
            if logprobs:
                ids = batch.completion_ids().to(hidden.device)[batch.loss_mask().to(hidden.device)]
                out.student_logprobs = fused_token_logprobs(hidden, weight, ids, head_bias=bias)
            if distill:
                out.loss, out.divergence = fused_per_token_loss(
                    hidden, head, batch, scores, self.config
                )
            return out

        return as_forward(self.student, terms)

    def loss(self, batch: SequenceBatch, scored: Scored, num_tokens: int):
        terms = self.token_terms(batch, scored.value)
        report_divergence(self.teacher, scored.value, batch, terms.divergence, None)
        return terms.loss.sum() / max(num_tokens, 1), float(terms.divergence.sum())
