"""Teacher scores in the teacher's token grid -> `TeacherScores` on the student's grid.

* `token` (pg): each span's teacher log-prob (the sum over its teacher tokens) at the
  column of the span's last student token, 0 elsewhere; `span_end` names, for each student
  position, that column, so the estimator sums the student's log-probs over the same span.
* `topk` / `logits` (kd): at one-to-one spans (one student token, one teacher token, the
  same bytes after the same prefix) the teacher's distribution in the student's vocabulary
  (`vocab_map`), as top-k ids and log-probs; a full distribution becomes every mapped id.
  Positions inside multi-token spans are not `aligned`, so they add nothing
  (`cross_tokenizer.span_kd=masked`); with `span_kd=span` they are, and carry the `token`
  scores of their span (`token_logprobs` at the span's last column, `span_end` naming it;
  -1 at one-to-one positions), for the loss to apply the sampled estimator's span term
  there (`opd.objectives.plain.span_terms`).
"""

from __future__ import annotations

import math

import torch

from opd.teachers.base import TeacherScores
from opd.teachers.cross_tokenizer.boundary import teacher_id_grid
from opd.teachers.cross_tokenizer.boundary_kd import mix_full, mix_topk
from opd.teachers.cross_tokenizer.render import RowAlignment
from opd.teachers.cross_tokenizer.vocab_map import VocabMap


def span_grids(rows: list[RowAlignment], B: int, L: int, Lt: int, multi_only: bool = False):
    """(`span_end` [B, L], the student column each teacher token's span ends at [B, Lt],
    the one-to-one pairs as (rows, student cols, teacher cols)); -1 where no span (and, with
    `multi_only`, at one-to-one spans)."""
    span_end = torch.full((B, L), -1, dtype=torch.long)
    t_to_s = torch.full((B, Lt), -1, dtype=torch.long)
    pairs: tuple[list[int], list[int], list[int]] = ([], [], [])
    for b, row in enumerate(rows):
        for s in row.alignment.spans:
            if not s.two_sided or (multi_only and s.one_to_one):
                continue
            span_end[b, s.s0 : s.s1] = s.s1 - 1
            t_to_s[b, s.t0 : s.t1] = s.s1 - 1
            if s.one_to_one and not multi_only:
                pairs[0].append(b)
                pairs[1].append(s.s0)
                pairs[2].append(s.t0)
    return span_end, t_to_s, pairs


def span_logprobs(t_lp: torch.Tensor, t_to_s: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """Teacher token log-probs `[B, Lt']` summed per span onto the span's last student
    column of a zero `[B, L]` grid (`t_to_s`: each teacher token's column, -1: none)."""
    dev, Lt = t_lp.device, t_to_s.shape[1]
    t_to_s = t_to_s.to(dev)
    t_lp = torch.nn.functional.pad(t_lp, (0, max(0, Lt - t_lp.shape[1])))[:, :Lt]
    where = t_to_s >= 0
    flat = (torch.arange(B, device=dev)[:, None] * L + t_to_s)[where]
    grid = torch.zeros(B * L, dtype=t_lp.dtype, device=dev).index_add_(0, flat, t_lp[where])
    return grid.view(B, L)


def teacher_token_logprobs(rows: list[RowAlignment], teacher: TeacherScores) -> torch.Tensor:
    """The teacher's log-probs of its own completion tokens `[B, Lt']` at temperature 1:
    as scored, or from its full logits."""
    if teacher.token_logprobs is not None:
        return teacher.token_logprobs
    logits = teacher.logits
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return completion_logprobs(rows, torch.log_softmax(logits.to(dtype), dim=-1))


def completion_logprobs(rows: list[RowAlignment], logp: torch.Tensor) -> torch.Tensor:
    """`[B, Lt]`: the log-probs `logp` `[B, Lt, V]` gives the teacher's own completion tokens."""
    ids = teacher_id_grid(rows, logp.shape[1]).to(logp.device)
    return logp.gather(-1, ids[..., None]).squeeze(-1)


def student_grid_scores(
    rows: list[RowAlignment],
    L: int,
    teacher: TeacherScores,
    need: str,
    vocab: VocabMap,
    temperature: float = 1.0,
    span_kd: str = "masked",
    mixture=None,
) -> TeacherScores:
    """`teacher` (scores of the teacher's batch, completion-aligned `[B, Lt, ...]`) on the
    student's `[B, L]` completion grid (module doc). `mixture(pairs)`: for kd, the
    one-to-one positions' correction after a teacher boundary that depends on what follows
    (`boundary_kd.BoundaryMixture`), None where none applies."""
    B = len(rows)
    Lt = max([len(r.teacher_ids) for r in rows] + [1])
    span_end, t_to_s, (pb, ps, pt) = span_grids(rows, B, L, Lt)
    if need == "token":
        grid = span_logprobs(teacher.token_logprobs, t_to_s, B, L)
        span_end = span_end.to(grid.device)
        return TeacherScores(
            token_logprobs=grid,
            tokens_scored=teacher.tokens_scored,
            span_end=span_end,
            aligned=span_end >= 0,
        )
    mixed = mixture((pb, ps, pt)) if mixture is not None else None
    pair_tail = None
    if need == "topk":
        sel_ids, sel_lp = teacher.topk_ids[pb, pt], teacher.topk_logprobs[pb, pt]
        mapped_ids, mapped_lp = vocab.topk(sel_ids, sel_lp)
        if teacher.topk_tail_logmass is not None:
            # the teacher's exact tail, plus its top-k entries that map to no student token
            t2s = vocab.t2s.to(sel_ids.device)
            lost = (sel_ids < 0) | (t2s[sel_ids.clamp(min=0)] < 0)
            lost_lp = torch.where(lost, sel_lp, torch.full_like(sel_lp, -math.inf))
            sel_tail = teacher.topk_tail_logmass[pb, pt].to(lost_lp.dtype)[:, None]
            pair_tail = torch.logsumexp(torch.cat([sel_tail, lost_lp], dim=-1), dim=-1)
        if mixed is not None:
            mapped_ids, mapped_lp, pair_tail = mix_topk(mixed, mapped_ids, mapped_lp, pair_tail, vocab.merge)
    else:  # full: every mapped student id, from the teacher's tempered distribution
        logits = teacher.logits
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        mapped_lp = vocab.full(torch.log_softmax(logits[pb, pt].to(dtype) / temperature, dim=-1))
        if mixed is not None:
            mapped_lp = mix_full(mixed, mapped_lp, vocab.student_ids)
        mapped_ids = vocab.student_ids.to(mapped_lp.device).expand(mapped_lp.shape[0], -1)
    dev, K = mapped_lp.device, mapped_ids.shape[-1]
    out_ids = torch.full((B, L, K), -1, dtype=torch.long, device=dev)
    out_lp = torch.full((B, L, K), -math.inf, dtype=mapped_lp.dtype, device=dev)
    out_ids[pb, ps], out_lp[pb, ps] = mapped_ids, mapped_lp
    aligned = torch.zeros((B, L), dtype=torch.bool, device=dev)
    aligned[pb, ps] = True
    tail = None
    if pair_tail is not None:
        tail = torch.zeros((B, L), dtype=mapped_lp.dtype, device=dev)  # unaligned: all tail
        tail[pb, ps] = pair_tail.to(dev, mapped_lp.dtype)
    out = TeacherScores(
        topk_ids=out_ids, topk_logprobs=out_lp, topk_tail_logmass=tail,
        tokens_scored=teacher.tokens_scored, aligned=aligned,
    )  # fmt: skip
    if span_kd == "span":  # multi-token spans: the sampled estimator's span term (module doc)
        multi_end, multi_t, _ = span_grids(rows, B, L, Lt, multi_only=True)
        grid = span_logprobs(teacher_token_logprobs(rows, teacher), multi_t, B, L)
        out.token_logprobs, out.span_end = grid.to(dev), multi_end.to(dev)
        out.aligned = aligned | out.span_end.ge(0)
    return out
