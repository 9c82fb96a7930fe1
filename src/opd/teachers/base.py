"""What every teacher provides: scores for given token sequences.

Teachers never choose the sequences (the loop does) and never get gradients. A local
model returns full logits; remote and cached teachers return the sampled token's
log-prob and optionally top-k log-probs, which is all the sparse and sampled estimators
need. All outputs are completion-aligned `[B, L, ...]` (see `opd.batch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from opd.batch import SequenceBatch

NEEDS = ("logits", "topk", "token")


@dataclass
class TeacherScores:
    # Full next-token logits over the shared vocabulary, [B, L, V]; local teachers only.
    logits: torch.Tensor | None = None
    # log p_T(target token), [B, L] (at temperature 1).
    token_logprobs: torch.Tensor | None = None
    # Top-k ids and normalized log-probs, [B, L, k], at the temperature `score` was asked for
    # (the loss's kd_temperature: both sides of a top-k divergence must be tempered alike).
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tokens_scored: int = 0  # completion tokens the teacher scored (cost accounting)


@runtime_checkable
class Teacher(Protocol):
    """`score(batch, need, topk, temperature)`: need is 'logits' (full), 'topk' or 'token';
    `temperature` applies to the top-k log-probs (token log-probs are always at 1)."""

    def score(
        self, batch: SequenceBatch, need: str, topk: int = 0, temperature: float = 1.0
    ) -> TeacherScores: ...


def check_need(need: str, topk: int) -> None:
    if need not in NEEDS:
        raise ValueError(f"teacher output {need!r} not in {NEEDS}")
    if need == "topk" and topk <= 0:
        raise ValueError(f"top-k teacher output needs topk > 0, got {topk}")


def check_untempered(kind: str, temperature: float) -> None:
    """Teachers that only hold log-probs at temperature 1 (remote, cached) cannot temper a
    top-k: that needs the full distribution's normalizer."""
    if temperature != 1.0:
        raise ValueError(
            f"teacher.kind={kind} returns top-k log-probs at temperature 1 only; "
            f"loss.kd_temperature={temperature} needs a local or self teacher"
        )


def scores_from_logits(
    logits_BTV: torch.Tensor,
    batch: SequenceBatch,
    need: str,
    topk: int,
    temperature: float = 1.0,
) -> TeacherScores:
    """Turn full teacher logits into the requested output (shared by local-model teachers).

    Top-k log-probs are of softmax(logits / temperature), the distribution the loss compares
    the equally tempered student to; the sampled token's log-prob is at temperature 1."""
    check_need(need, topk)
    n = batch.num_target_tokens()
    if need == "logits":
        return TeacherScores(logits=logits_BTV, tokens_scored=n)
    logp = torch.log_softmax(logits_BTV.float(), dim=-1)
    ids = batch.completion_ids().to(logp.device)
    token = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if need == "token":
        return TeacherScores(token_logprobs=token, tokens_scored=n)
    if temperature != 1.0:
        logp = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    values, ids = logp.topk(min(topk, logp.shape[-1]), dim=-1)
    return TeacherScores(token_logprobs=token, topk_ids=ids, topk_logprobs=values, tokens_scored=n)
