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
from opd.losses import fused_token_divergence, fused_token_logprobs
from opd.modeling.forward import supervised_hidden
from opd.modeling.hf import lm_head, supports_fused_head
from opd.modeling.wrapped import as_forward
from opd.objectives.base import Scored, TokenTerms
from opd.teachers.local import LocalTeacher


def fused_applies(loss: LossConfig, student, teacher) -> bool:
    """Whether the fused objectives compute this run's loss (see `why_not_fused`)."""
    return why_not_fused(loss, student, teacher) is None


def why_not_fused(loss: LossConfig, student, teacher, distributed: bool = False) -> str | None:
    """None when the fused objectives can compute this run's loss, else why not: the
    student's logits must be its head applied to hidden states; for kd over the full
    vocabulary the teacher's must be too, from a teacher that returns hidden states (local,
    or self in one process: the self teacher's model is the student's own module)."""
    if not supports_fused_head(student):
        return "the student's logits are more than its LM head on hidden states"
    if loss.objective != "kd" or loss.estimator != "full":
        return None
    model = getattr(teacher, "model", None)
    if not hasattr(teacher, "supervised_hidden") or model is None:
        return "full-vocabulary kd needs a teacher that returns hidden states (local or self)"
    if not supports_fused_head(model):
        return "the teacher's logits are more than its LM head on hidden states"
    if distributed and not isinstance(teacher, LocalTeacher):
        return "the self teacher's hidden states under DDP/FSDP"
    return None


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
    values = fused_divergences(student, teacher, hidden_teacher_NH, batch, loss, vocab_size)
    return values.sum() / max(num_tokens, 1), float(values.detach().sum())


def fused_divergences(
    student, teacher, hidden_teacher_NH, batch: SequenceBatch, loss: LossConfig, vocab_size: int,
    hidden_student: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[N]` divergence per supervised token (row-major), from both models' hidden states
    (the student's computed here unless given)."""
    if hidden_student is None:
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
    return values


class FusedObjective:
    """Full-vocabulary `kd` with a local or self teacher, from both models' hidden states."""

    def __init__(self, student, teacher, loss: LossConfig, vocab_size: int):
        self.student, self.teacher, self.config = student, teacher, loss
        self.vocab_size = vocab_size

    def score(self, batch: SequenceBatch) -> Scored:
        hidden = teacher_hidden(self.teacher, batch, self.config.fused_forward)
        return Scored(hidden, batch.num_target_tokens())

    def token_terms(
        self, batch: SequenceBatch, hidden_teacher, *, distill: bool = True, logprobs: bool = False
    ) -> TokenTerms:
        """As `FusedTokenObjective.token_terms`, the loss being the full-vocabulary divergence."""

        def terms(model) -> TokenTerms:
            out = TokenTerms()
            hidden = supervised_hidden(model, batch, self.config.fused_forward)
            if logprobs:
                weight, bias = lm_head(model, self.vocab_size)
                ids = batch.completion_ids().to(hidden.device)[batch.loss_mask().to(hidden.device)]
                out.student_logprobs = fused_token_logprobs(hidden, weight, ids, head_bias=bias)
            if distill:
                out.loss = fused_divergences(
                    model, self.teacher, hidden_teacher, batch, self.config, self.vocab_size,
                    hidden,
                )  # fmt: skip
                out.divergence = out.loss.detach()
            return out

        return as_forward(self.student, terms)

    def loss(self, batch: SequenceBatch, scored: Scored, num_tokens: int):
        terms = self.token_terms(batch, scored.value)
        return terms.loss.sum() / max(num_tokens, 1), float(terms.divergence.sum())
