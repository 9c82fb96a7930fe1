"""What every teacher provides: scores for given token sequences.

Teachers never choose the sequences (the loop does) and never get gradients. A local
model returns full logits; remote and cached teachers return the sampled token's
log-prob and optionally top-k log-probs, which is all the sparse and sampled estimators
need. All outputs are completion-aligned `[B, L, ...]` (see `opd.data.batch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from opd.data.batch import SequenceBatch

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
    # log of the mass outside the top-k, [B, L], where the teacher knows it exactly (from its
    # logits, or stored so): a confident teacher's top-k log-probs round to a sum of 1 in
    # float32, which no longer tells how much lies outside (opd.losses.sparse). None: the
    # loss infers it from the log-probs.
    topk_tail_logmass: torch.Tensor | None = None
    tokens_scored: int = 0  # completion tokens the teacher scored (cost accounting)
    # A teacher with another tokenizer (opd.teachers.cross_tokenizer): `[B, L]` bool, the
    # completion positions it scored (others add nothing to the loss), and for `token`
    # scores `[B, L]` long, the column of the last student token of each position's span
    # (its log-prob sits there, for the span's text); None means every position, one token
    # per span. With kd scores (`cross_tokenizer.span_kd=span`) `span_end` is >= 0 only
    # inside spans of several tokens, and `token_logprobs` holds those spans' log-probs:
    # the loss applies the sampled estimator's span term there, the divergence elsewhere.
    aligned: torch.Tensor | None = None
    span_end: torch.Tensor | None = None
    # Several teachers (opd.teachers.routing): teacher name -> the rows it scored, so the
    # loss can report each teacher's divergence (`opd.objectives.base.report_divergence`).
    routes: dict[str, list[int]] | None = None


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


# Positions whose full-vocabulary logits exist at once when a teacher scores from hidden
# states: 128 x 151,936 float32 is 78 MB (twice that with top-k's log-softmax).
SCORE_ROWS = 128


def _token_logprobs_consuming(z_NV: torch.Tensor, ids_N: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[ids], overwriting `z` (a fresh logits chunk): exponentiating in place
    keeps one `[rows, V]` tensor alive where `log_softmax` would add a second."""
    picked = z_NV.gather(-1, ids_N.unsqueeze(-1)).squeeze(-1)
    m = z_NV.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # as log_softmax: all -inf
    log_z = z_NV.sub_(m).exp_().sum(dim=-1).log_() + m.squeeze(-1)
    return picked - log_z


def _token_and_topk(logits_NV, ids_N, need: str, topk: int, temperature: float):
    """log p of `ids_N` (temperature 1) and, for need 'topk', the top-k ids, log-probs and
    tail log-mass of softmax(logits / temperature), from raw logits `[..., V]`.

    The tail is the log-sum-exp of the log-probs outside the top-k, never `1 - sum(top-k)`:
    where the rest weighs less than float32's resolution next to the top-1, the top-1's
    log-prob rounds to 0.0 and that difference reads an empty tail."""
    logp = torch.log_softmax(logits_NV.float(), dim=-1)
    token = logp.gather(-1, ids_N.unsqueeze(-1)).squeeze(-1)
    if need != "topk":
        return token, None, None, None
    if temperature != 1.0:
        logp = torch.log_softmax(logits_NV.float() / temperature, dim=-1)
    values, ids = logp.topk(min(topk, logp.shape[-1]), dim=-1)
    tail = torch.logsumexp(logp.scatter_(-1, ids, -math.inf), dim=-1)  # logp is ours to reuse
    return token, ids, values, tail


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
    ids = batch.completion_ids().to(logits_BTV.device)
    token, top_ids, top_lp, tail = _token_and_topk(logits_BTV, ids, need, topk, temperature)
    return TeacherScores(
        token_logprobs=token,
        topk_ids=top_ids,
        topk_logprobs=top_lp,
        topk_tail_logmass=tail,
        tokens_scored=n,
    )


def scores_from_hidden(
    hidden: torch.Tensor,
    head,
    vocab_size: int,
    batch: SequenceBatch,
    need: str,
    topk: int,
    temperature: float = 1.0,
    rows: int = SCORE_ROWS,
) -> TeacherScores:
    """`scores_from_logits(head(hidden)[..., :vocab_size], ...)` for need 'token' / 'topk',
    `rows` positions at a time, so `[B, T, V]` logits never exist. `head` is the model's
    output-embedding module, applied as the model applies it (same dtype, same bias).

    `hidden`: `[B, T, H]`, every completion cell; or `[N, H]`, the supervised cells only
    (`batch.loss_mask()`, row-major, as `opd.modeling.forward.supervised_hidden` returns
    them), so the head runs on those alone: the `[B, T]` grids returned then hold each
    supervised cell's scores, and every other cell repeats the first supervised cell's (a
    valid distribution, so nothing downstream meets a made-up value; no loss reads them)."""
    check_need(need, topk)
    if need == "logits":
        raise ValueError("full teacher logits cannot be scored from hidden states in chunks")
    B, T = batch.loss_mask().shape
    ids = batch.completion_ids().to(hidden.device)
    if hidden.dim() == 3:
        parts = _score_rows(hidden.reshape(B * T, -1), ids.reshape(-1), head, vocab_size, need,
                            topk, temperature, rows)  # fmt: skip
        return _scores([p.view(B, T, *p.shape[1:]) for p in parts], need, batch)
    mask = batch.loss_mask().to(hidden.device)
    parts = _score_rows(hidden, ids[mask], head, vocab_size, need, topk, temperature, rows)
    row_of = torch.zeros(B * T, dtype=torch.long, device=hidden.device)
    row_of[mask.reshape(-1)] = torch.arange(int(mask.sum()), device=hidden.device)
    return _scores([p[row_of].view(B, T, *p.shape[1:]) for p in parts], need, batch)


def _score_rows(flat, ids, head, vocab_size, need, topk, temperature, rows):
    """Per row of `flat [N, H]`: the token log-prob, and for 'topk' the top-k ids, log-probs
    and tail log-mass; `rows` at a time through the head."""
    N = flat.shape[0]
    if need == "token":  # each chunk's logits are ours: exponentiated in place
        return [torch.cat([
            _token_logprobs_consuming(head(flat[r : r + rows])[:, :vocab_size].float(), ids[r : r + rows])
            for r in range(0, N, rows)
        ])]  # fmt: skip
    parts = [
        _token_and_topk(
            head(flat[r : r + rows])[:, :vocab_size], ids[r : r + rows], need, topk, temperature
        )
        for r in range(0, N, rows)
    ]
    return [torch.cat([p[i] for p in parts]) for i in range(4)]


def _scores(grids: list[torch.Tensor], need: str, batch: SequenceBatch) -> TeacherScores:
    n = batch.num_target_tokens()
    if need == "token":
        return TeacherScores(token_logprobs=grids[0], tokens_scored=n)
    token, top_ids, top_lp, tail = grids
    return TeacherScores(
        token_logprobs=token,
        topk_ids=top_ids,
        topk_logprobs=top_lp,
        topk_tail_logmass=tail,
        tokens_scored=n,
    )
