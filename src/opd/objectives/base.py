"""The objective protocol (`Objective`), what scoring produced (`Scored`) and the objectives of
one optimizer step (`StepObjectives`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from opd.data.batch import SequenceBatch


@dataclass
class Scored:
    """What an objective's `score` produced for one micro-batch."""

    value: Any  # teacher output the loss reads (TeacherScores, hidden states, rewards...)
    tokens_scored: int = 0  # completion tokens the teacher scored (cost accounting)


@dataclass
class TokenTerms:
    """A fused objective's per-token values at `batch.loss_mask()`'s cells (row-major), `[N]`
    each, None where not asked for: what RL + distillation mixes (`opd.objectives.rl`)."""

    student_logprobs: torch.Tensor | None = None  # log p_S(y_t), differentiable
    loss: torch.Tensor | None = None  # the distillation loss per token, differentiable
    divergence: torch.Tensor | None = None  # its divergence estimate, detached

    def any(self) -> torch.Tensor:
        return next(t for t in (self.student_logprobs, self.loss) if t is not None)


class Objective(Protocol):
    def score(self, batch: SequenceBatch) -> Scored: ...

    def loss(
        self, batch: SequenceBatch, scored: Scored, num_tokens: float
    ) -> tuple[torch.Tensor, float]:
        """`(summed token losses / num_tokens, summed divergence estimate)`. The loop passes
        the batch's source denominator (`opd.run.sources.loss_denominators`: that source's
        tokens in the step over its weight), so GKD's λ weighs sources, not tokens."""
        ...


class StepObjectives:
    """The objectives of one optimizer step: which one scores and backs each micro-batch.

    Student micro-batches of an RL + distillation run carry a reward term (`opd.objectives.rl`);
    every other micro-batch uses the run's distillation objective (fused or plain)."""

    def __init__(self, distill: Objective, rewarded: Objective | None = None):
        self.distill, self.rewarded = distill, rewarded

    def for_batch(self, batch: SequenceBatch) -> Objective:
        if self.rewarded is not None and batch.source == "student":
            return self.rewarded
        return self.distill

    def record(self) -> dict:
        """Per-step JSONL fields the objectives add (the reward terms of RL + KD)."""
        return self.rewarded.record() if self.rewarded is not None else {}


def report_divergence(teacher, scores, batch: SequenceBatch, divergence, mask_BL) -> None:
    """Several teachers (`opd.teachers.routing`): hand the router this micro-batch's
    divergence summed by row, from the per-token terms the loss summed (no second forward),
    so each teacher's divergence is logged. `divergence` is `[B, L]`, summed where `mask_BL`
    holds (the plain objectives), or `[N]` at `batch.loss_mask()`'s cells, row-major (the
    fused ones). A no-op for scores of any other teacher."""
    routes = getattr(scores, "routes", None)
    if routes is None or not hasattr(teacher, "add_divergence"):
        return
    values = divergence.detach().double()
    if values.dim() == 2:
        mask = mask_BL.to(values.device).bool()
        per_row = torch.where(mask, values, torch.zeros_like(values)).sum(-1)
    else:
        rows = batch.loss_mask().to(values.device).nonzero(as_tuple=True)[0]
        per_row = values.new_zeros(batch.size).index_add_(0, rows, values)
    # tokens: the step divergence's denominator counts every supervised token
    teacher.add_divergence(routes, per_row.cpu(), batch.loss_mask().sum(-1).cpu())
