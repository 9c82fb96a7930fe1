"""Fused objectives: the loss from the student's hidden states and LM head, never its
`[tokens, vocab]` logits; tested equal to `opd.objectives.plain`.

* `FusedObjective` (kd, full vocabulary): both models' hidden states, the divergence in
  tiles (`opd.losses.fused`); the teacher is a local model or the self teacher (OPSD).
* `FusedTokenObjective` (`fused_tokens.py`: ce, pg, kd with top-k): the student's side
  needs a few numbers per position, whatever teacher scored the batch.

Only supervised rows are passed to the tiled losses and reduced with one constant weight,
which lets the fused divergence reuse the gradient it formed during its forward.
"""

from __future__ import annotations

import torch

from opd.config.parse import LossConfig
from opd.data.batch import SequenceBatch
from opd.losses import fused_token_divergence
from opd.modeling.hf import completion_hidden, lm_head, supports_fused_head
from opd.modeling.lean import lean_supported, packed_supervised_hidden
from opd.modeling.lean_check import check_packed_forward
from opd.objectives.base import Scored


def fused_applies(loss: LossConfig, student, teacher) -> bool:
    """Whether the fused objectives compute this run's loss: the student's logits are its
    head applied to hidden states; for kd over the full vocabulary the teacher's must be
    too, from a teacher that returns hidden states (local or self)."""
    if not supports_fused_head(student):
        return False
    if loss.objective != "kd" or loss.estimator != "full":
        return True
    model = getattr(teacher, "model", None)
    return (
        hasattr(teacher, "supervised_hidden") and model is not None and supports_fused_head(model)
    )


def supervised_hidden(model, batch: SequenceBatch, forward: str = "hf") -> torch.Tensor:
    """`completion_hidden(model, batch)[batch.loss_mask()]`, `[N, H]`.

    `forward="lean"` (`loss.fused_forward`): the packed forward of `opd.modeling.lean` (real
    tokens only), checked against the Hugging Face forward on the first batch of each model;
    models it does not support take the Hugging Face forward."""
    if forward == "lean" and lean_supported(model):
        check_packed_forward(model, batch)
        return packed_supervised_hidden(model, batch)
    return completion_hidden(model, batch)[batch.loss_mask()]


@torch.no_grad()
def teacher_hidden(teacher, batch: SequenceBatch, forward: str = "hf") -> torch.Tensor:
    """Teacher's final hidden states on the supervised completion positions, `[N, Ht]`."""
    return teacher.supervised_hidden(batch, lambda m, b: supervised_hidden(m, b, forward))


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
    hidden_student = supervised_hidden(student, batch, loss.fused_forward)
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
    """Full-vocabulary `kd` with a local or self teacher, from both models' hidden states."""

    def __init__(self, student, teacher, loss: LossConfig, vocab_size: int):
        self.student, self.teacher, self.config = student, teacher, loss
        self.vocab_size = vocab_size

    def score(self, batch: SequenceBatch) -> Scored:
        hidden = teacher_hidden(self.teacher, batch, self.config.fused_forward)
        return Scored(hidden, batch.num_target_tokens())

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
