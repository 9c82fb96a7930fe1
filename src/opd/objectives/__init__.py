"""Objectives: the loss of one micro-batch, and what it needs from the teacher.

Every objective is one small protocol, so the loop never branches on which one runs:

    scored = objective.score(batch)                       # teacher work, no gradient
    loss, divergence_sum = objective.loss(batch, scored, num_tokens)

Implementations: `plain` (ce / kd / pg from the student's logits), `fused` and
`fused_tokens` (the same values from hidden states, never holding `[tokens, vocab]` logits) and `rl` (a task reward
mixed with distillation, GKD's α). `for_step` picks one per micro-batch.
"""

from __future__ import annotations

from opd.objectives.base import Objective, Scored, StepObjectives
from opd.objectives.fused import FusedObjective
from opd.objectives.fused_tokens import FusedTokenObjective
from opd.objectives.plain import PlainObjective
from opd.objectives.rl import RewardObjective

__all__ = ["Objective", "Scored", "StepObjectives", "build_objective", "for_step"]

IMPLEMENTATIONS = {
    "fused_full": FusedObjective,
    "fused_tokens": FusedTokenObjective,
    "plain": PlainObjective,
}


def build_objective(implementation: str, student, teacher, loss, vocab_size: int) -> Objective:
    """The distillation objective by implementation name (`opd.run.path.RunPath.objective`)."""
    return IMPLEMENTATIONS[implementation](student, teacher, loss, vocab_size)


def for_step(run) -> StepObjectives:
    """This step's objectives for `run` (an `opd.run.setup.RunSetup`), as `run.path` decided."""
    args = (run.student, run.teacher, run.config.loss, run.vocab_size)
    distill = build_objective(run.path.objective, *args)
    # RL + distillation's student batches: the same distillation objective (fused or plain)
    # plus the reward term, from the same student pass
    rewarded = RewardObjective(run, distill) if run.path.rewarded is not None else None
    return StepObjectives(distill, rewarded)
