"""Teacher scores in the teacher's token grid -> `TeacherScores` on the student's grid.

* `token` (pg): each span's teacher log-prob (the sum over its teacher tokens) at the
  column of the span's last student token, 0 elsewhere; `span_end` names, for each student
  position, that column, so the estimator sums the student's log-probs over the same span.
* `topk` / `logits` (kd): at one-to-one spans (one student token, one teacher token, the
  same bytes after the same prefix) the teacher's distribution in the student's vocabulary
  (`vocab_map`), as top-k ids and log-probs; a full distribution becomes every mapped id.
  Positions inside multi-token spans are not `aligned`, so they add nothing.
"""

from __future__ import annotations

import math

import torch

from opd.teachers.base import TeacherScores
from opd.teachers.cross_tokenizer.render import RowAlignment
from opd.teachers.cross_tokenizer.vocab_map import VocabMap


def span_grids(rows: list[RowAlignment], B: int, L: int, Lt: int):
    """(`span_end` [B, L], the student column each teacher token's span ends at [B, Lt],
    the one-to-one pairs as (rows, student cols, teacher cols)); -1 where no span."""
    span_end = torch.full((B, L), -1, dtype=torch.long)
    t_to_s = torch.full((B, Lt), -1, dtype=torch.long)
    pairs: tuple[list[int], list[int], list[int]] = ([], [], [])
    for b, row in enumerate(rows):
        for s in row.alignment.spans:
            if not s.two_sided:
                continue
            span_end[b, s.s0 : s.s1] = s.s1 - 1
            t_to_s[b, s.t0 : s.t1] = s.s1 - 1
            if s.one_to_one:
                pairs[0].append(b)
                pairs[1].append(s.s0)
                pairs[2].append(s.t0)
    return span_end, t_to_s, pairs


def student_grid_scores(
    rows: list[RowAlignment],
    L: int,
    teacher: TeacherScores,
    need: str,
    vocab: VocabMap,
    temperature: float = 1.0,
) -> TeacherScores:
    """`teacher` (scores of the teacher's batch, completion-aligned `[B, Lt, ...]`) on the
    student's `[B, L]` completion grid (module doc)."""
    B = len(rows)
    Lt = max([len(r.teacher_ids) for r in rows] + [1])
    span_end, t_to_s, (pb, ps, pt) = span_grids(rows, B, L, Lt)
    if need == "token":
        t_lp = teacher.token_logprobs
        dev = t_lp.device
        span_end, t_to_s = span_end.to(dev), t_to_s.to(dev)
        t_lp = torch.nn.functional.pad(t_lp, (0, max(0, Lt - t_lp.shape[1])))[:, :Lt]
        where = t_to_s >= 0
        flat = (torch.arange(B, device=dev)[:, None] * L + t_to_s)[where]
        grid = torch.zeros(B * L, dtype=t_lp.dtype, device=dev).index_add_(0, flat, t_lp[where])
        return TeacherScores(
            token_logprobs=grid.view(B, L),
            tokens_scored=teacher.tokens_scored,
            span_end=span_end,
            aligned=span_end >= 0,
        )
    if need == "topk":
        sel_ids, sel_lp = teacher.topk_ids[pb, pt], teacher.topk_logprobs[pb, pt]
        mapped_ids, mapped_lp = vocab.topk(sel_ids, sel_lp)
    else:  # full: every mapped student id, from the teacher's tempered distribution
        logits = teacher.logits
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        mapped_lp = vocab.full(torch.log_softmax(logits[pb, pt].to(dtype) / temperature, dim=-1))
        mapped_ids = vocab.student_ids.to(mapped_lp.device).expand(mapped_lp.shape[0], -1)
    dev, K = mapped_lp.device, mapped_ids.shape[-1]
    out_ids = torch.full((B, L, K), -1, dtype=torch.long, device=dev)
    out_lp = torch.full((B, L, K), -math.inf, dtype=mapped_lp.dtype, device=dev)
    out_ids[pb, ps], out_lp[pb, ps] = mapped_ids, mapped_lp
    aligned = torch.zeros((B, L), dtype=torch.bool, device=dev)
    aligned[pb, ps] = True
    tail = None
    if need == "topk" and teacher.topk_tail_logmass is not None:
        # the teacher's exact tail, plus its top-k entries that map to no student token
        t2s = vocab.t2s.to(sel_ids.device)
        lost = (sel_ids < 0) | (t2s[sel_ids.clamp(min=0)] < 0)
        lost_lp = torch.where(lost, sel_lp, torch.full_like(sel_lp, -math.inf))
        sel_tail = teacher.topk_tail_logmass[pb, pt].to(lost_lp.dtype)[:, None]
        tail = torch.zeros((B, L), dtype=mapped_lp.dtype, device=dev)  # unaligned: all tail
        tail[pb, ps] = torch.logsumexp(torch.cat([sel_tail, lost_lp], dim=-1), dim=-1).to(dev)
    return TeacherScores(
        topk_ids=out_ids, topk_logprobs=out_lp, topk_tail_logmass=tail,
        tokens_scored=teacher.tokens_scored, aligned=aligned,
    )  # fmt: skip
