"""A local Hugging Face teacher: frozen, eval mode, no gradients.

Its model may be sharded over processes (`teacher.shard`, FSDP2): every pass runs as the
model's forward (`opd.modeling.wrapped.as_forward`), so the sharded weights are gathered."""

from __future__ import annotations

import torch

from opd.data.batch import SequenceBatch
from opd.modeling.forward import supervised_hidden
from opd.modeling.hf import completion_hidden, completion_logits, supports_fused_head
from opd.modeling.wrapped import as_forward
from opd.teachers.base import TeacherScores, scores_from_hidden, scores_from_logits


class LocalTeacher:
    """`forward` (`loss.fused_forward`): the decoder forward of its token and top-k scores;
    under `auto` / `lean` the packed forward of the models it covers, so neither the body
    nor the head runs on padding (`opd.modeling.forward`)."""

    def __init__(self, model, vocab_size: int, forward: str = "hf"):
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = vocab_size
        self.forward = forward

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(
        self, batch: SequenceBatch, need: str, topk: int = 0, temperature: float = 1.0
    ) -> TeacherScores:
        on_device = batch.to(self.device)
        if need != "logits" and supports_fused_head(self.model):
            # Token and top-k log-probs need a few numbers per position: run the head over
            # the hidden states a chunk of positions at a time instead of [B, L, V] logits.
            def chunked(model):
                head, vocab = model.get_output_embeddings(), self.vocab_size
                if self.forward != "hf" and bool(on_device.loss_mask().any()):
                    hidden = supervised_hidden(model, on_device, self.forward)  # [N, H]
                else:
                    hidden = completion_hidden(model, on_device)  # [B, T, H]
                return scores_from_hidden(hidden, head, vocab, batch, need, topk, temperature)

            return as_forward(self.model, chunked)
        logits = completion_logits(self.model, on_device, self.vocab_size)
        return scores_from_logits(logits, batch, need, topk, temperature)

    @torch.no_grad()
    def supervised_hidden(self, batch: SequenceBatch, forward) -> torch.Tensor:
        """Final hidden states at `batch.loss_mask()` (row-major), `[N, H]`, computed by
        `forward(model, batch)` (the fused objectives' choice of decoder forward)."""
        on_device = batch.to(self.device)
        return as_forward(self.model, lambda model: forward(model, on_device))
