"""Fast path for `kd` with a local teacher: the divergence straight from hidden states.

Equal to `objectives.plain.batch_loss` on full logits (tested), but neither model's
`[tokens, vocab]` logits are ever materialized (`opd.losses.fused`). Only supervised rows
are passed in and reduced with one constant weight, which lets the fused backward reuse
the gradient it formed during the forward.
"""

from __future__ import annotations

import torch

from opd.batch import SequenceBatch
from opd.config import LossConfig
from opd.losses import fused_token_divergence
from opd.modeling.hf import completion_hidden, lm_head, supports_fused_head
from opd.modeling.lean import lean_supported, packed_supervised_hidden
from opd.objectives import Scored


def fused_applies(loss: LossConfig, student, teacher) -> bool:
    """Both models local, plain linear heads, and a full-vocabulary `kd` objective."""
    model = getattr(teacher, "model", None)
    return (
        loss.objective == "kd"
        and loss.estimator == "full"
        and type(teacher).__name__ == "LocalTeacher"
        and model is not None
        and supports_fused_head(student)
        and supports_fused_head(model)
    )


def supervised_hidden(model, batch: SequenceBatch) -> torch.Tensor:
    """`completion_hidden(model, batch)[batch.loss_mask()]`, `[N, H]`: by the packed forward
    of `opd.modeling.lean` (real tokens only; tested equal) where the architecture allows it."""
    if lean_supported(model):
        return packed_supervised_hidden(model, batch)
    return completion_hidden(model, batch)[batch.loss_mask()]


@torch.no_grad()
def teacher_hidden(teacher, batch: SequenceBatch) -> torch.Tensor:
    """Teacher's final hidden states on the supervised completion positions, `[N, Ht]`."""
    return supervised_hidden(teacher.model, batch.to(teacher.device))


def fused_batch_loss(
    student,
    teacher,
    hidden_teacher_NH: torch.Tensor,
    batch: SequenceBatch,
    loss: LossConfig,
    num_tokens: int,
    vocab_size: int,
) -> tuple[torch.Tensor, float]:
    """Same contract as `objectives.plain.batch_loss`: (loss / step token count, divergence sum)."""
    hidden_student = supervised_hidden(student, batch)
    ws, bs = lm_head(student, vocab_size)
    wt, bt = lm_head(teacher.model, vocab_size)
    values = fused_token_divergence(
        hidden_student,
        ws,
        hidden_teacher_NH.to(hidden_student.device),
        wt.to(hidden_student.device),
        loss.divergence,
        beta=loss.beta,
        alpha=loss.skew_alpha,
        kd_temperature=loss.kd_temperature,
        student_head_bias=bs,
        teacher_head_bias=None if bt is None else bt.to(hidden_student.device),
    )
    return values.sum() / max(num_tokens, 1), float(values.detach().sum())


class FusedObjective:
    """Full-vocabulary `kd` with a local teacher, from both models' hidden states."""

    def __init__(self, student, teacher, loss: LossConfig, vocab_size: int):
        self.student, self.teacher, self.config, self.vocab_size = (
            student,
            teacher,
            loss,
            vocab_size,
        )

    def score(self, batch: SequenceBatch) -> Scored:
        return Scored(teacher_hidden(self.teacher, batch), batch.num_target_tokens())

    def loss(self, batch: SequenceBatch, scored: Scored, num_tokens: int):
        return fused_batch_loss(
            self.student,
            self.teacher,
            scored.value,
            batch,
            self.config,
            num_tokens,
            self.vocab_size,
        )
