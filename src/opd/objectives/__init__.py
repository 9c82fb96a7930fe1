"""Objectives: the loss of one micro-batch, and what it needs from the teacher.

Every objective is one small protocol, so the loop never branches on which one runs:

    scored = objective.score(batch)                       # teacher work, no gradient
    loss, divergence_sum = objective.loss(batch, scored, num_tokens)

Implementations: `plain` (ce / kd / pg from the student's logits), `fused` and
`fused_tokens` (the same values from hidden states, never holding `[tokens, vocab]` logits) and `rl` (a task reward
mixed with distillation, GKD's α). `for_step` picks one per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from opd.batch import SequenceBatch


@dataclass
class Scored:
    """What an objective's `score` produced for one micro-batch."""

    value: Any  # teacher output the loss reads (TeacherScores, hidden states, rewards...)
    tokens_scored: int = 0  # completion tokens the teacher scored (cost accounting)


class Objective(Protocol):
    def score(self, batch: SequenceBatch) -> Scored: ...

    def loss(
        self, batch: SequenceBatch, scored: Scored, num_tokens: float
    ) -> tuple[torch.Tensor, float]:
        """`(summed token losses / num_tokens, summed divergence estimate)`. The loop passes
        the batch's source denominator (`opd.sources.loss_denominators`: that source's
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


def for_step(run) -> StepObjectives:
    """This step's objectives for `run` (an `opd.run_setup.RunSetup`)."""
    from opd.objectives.fused import fused_objective
    from opd.objectives.plain import PlainObjective
    from opd.objectives.rl import RewardObjective

    if run.fused:
        distill = fused_objective(run.student, run.teacher, run.config.loss, run.vocab_size)
    else:
        distill = PlainObjective(run.student, run.teacher, run.config.loss, run.vocab_size)
    rewarded = None
    if run.reward_fn is not None:
        rewarded = RewardObjective(
            run, PlainObjective(run.student, run.teacher, run.config.loss, run.vocab_size)
        )
    return StepObjectives(distill, rewarded)
