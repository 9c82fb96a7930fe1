"""A local Hugging Face teacher: frozen, eval mode, no gradients."""

from __future__ import annotations

import torch

from opd.batch import SequenceBatch
from opd.modeling.hf import completion_logits
from opd.teachers.base import TeacherScores, scores_from_logits


class LocalTeacher:
    def __init__(self, model, vocab_size: int):
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(
        self, batch: SequenceBatch, need: str, topk: int = 0, temperature: float = 1.0
    ) -> TeacherScores:
        logits = completion_logits(self.model, batch.to(self.device), self.vocab_size)
        return scores_from_logits(logits, batch, need, topk, temperature)
