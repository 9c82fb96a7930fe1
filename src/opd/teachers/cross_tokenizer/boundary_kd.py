"""kd at one-to-one positions after a teacher boundary that depends on what follows
(`cross_tokenizer.boundary=marginal`): the teacher's next token given the text, not given
its own boundary.

At a one-to-one position (a student token and teacher token `t_j` of the same bytes after
the same prefix) the teacher's distribution is conditioned on its tokens `t_<j`, which end
at a boundary after `t_{j-1}`. Where `t_{j-1}` has extensions the student could not merge
(`boundary.BoundaryMarginal.extensions`: a standalone `o` where `o7` is a teacher token),
that boundary says "the text does not go on as those do" (the benchmark's mapped teacher
gave a digit after a label 0.0001, the teacher read one token earlier 1.0). Given the text,
the next student token is, to first order, the mixture

    q(x) = w q_T(x | t_<j) + sum_c p_T(c | t_<j-1) / M [x = s(c)]

over `t_{j-1}`'s kept extensions `c`, `M` the teacher's mass on `t_{j-1}` and them,
`w = p_T(t_{j-1}) / M`, `s(c)` the student's first token of the text `c` adds past
`t_{j-1}` (mass whose text the student cannot begin goes to the tail). The distribution at
`j-1` is read at the loss's temperature: from the teacher's logits (full kd) or its top-k
(top-k kd, at temperature 1 only: a tempered top-k has no exact log-prob for `t_{j-1}`
itself outside it, so at other temperatures the positions keep the mapped distribution).
"""

from __future__ import annotations

import math

import torch

from opd.teachers.cross_tokenizer.align import ByteTable
from opd.teachers.cross_tokenizer.boundary import BoundaryMarginal
from opd.teachers.cross_tokenizer.vocab_map import student_first_id


class BoundaryMixture:
    """Per one-to-one pair: the log weight of the teacher's own distribution and the
    extension entries to mix in (module doc)."""

    def __init__(self, boundary: BoundaryMarginal, teacher_table: ByteTable, student_first, topk: int):
        self.boundary, self.t_table = boundary, teacher_table
        self.student_first, self.topk = student_first, topk
        self._first: dict[tuple[int, int], int] = {}  # (teacher id, bytes skipped) -> student id

    def first_after(self, c: int, skip: int) -> int:
        key = (c, skip)
        if key not in self._first:
            self._first[key] = student_first_id(self.student_first, self.t_table.get(c)[skip:])
        return self._first[key]

    def __call__(self, rows, student_ids, teacher, pairs, need: str, temperature: float):
        """(`[N]` log w, `[N, K]` student ids (-1: none) and log-probs of the extension
        entries, `[N]` log of their mass the student's vocabulary cannot begin) for the
        one-to-one `pairs` (rows, student cols, teacher cols); None where nothing applies."""
        pb, _, pt = (torch.tensor(x, dtype=torch.long) for x in pairs)
        if not len(pb) or (need == "topk" and temperature != 1.0):
            return None
        dist = teacher.logits if need == "logits" else teacher.token_logprobs
        Lt = dist.shape[1]
        t_ids, s_last = self.boundary.positions(rows, student_ids, Lt)
        before = (pt - 1).clamp(min=0)
        t_prev, s_prev = t_ids[pb, before], torch.where(pt > 0, s_last[pb, before], -1)
        dev = dist.device
        pb, before = pb.to(dev), before.to(dev)
        if need == "logits":
            lp_all = torch.log_softmax(teacher.logits[pb, before].double() / temperature, dim=-1)
            tok_lp = lp_all.gather(-1, t_prev.to(dev)[:, None]).squeeze(-1)
            cand_lp, cand = lp_all.topk(min(self.topk, lp_all.shape[-1]), dim=-1)
        else:
            tok_lp = teacher.token_logprobs[pb, before].double()
            cand, cand_lp = teacher.topk_ids[pb, before], teacher.topk_logprobs[pb, before].double()
        keep, marginal = self.boundary.extensions(t_prev, s_prev, tok_lp, cand, cand_lp)
        s_prev = s_prev.to(dev)
        log_w = torch.where(torch.isfinite(tok_lp) & (s_prev >= 0), tok_lp - marginal, torch.zeros_like(tok_lp))
        if not bool((log_w < 0).any()):
            return None
        e_ids = torch.full(cand.shape, -1, dtype=torch.long)
        for n, k in keep.nonzero().tolist():
            skip = len(self.t_table.get(int(t_prev[n])))
            e_ids[n, k] = self.first_after(int(cand[n, k]), skip)
        e_ids = e_ids.to(dev)
        e_lp = torch.where(keep, cand_lp - marginal[:, None], torch.full_like(cand_lp, -math.inf))
        lost = torch.logsumexp(torch.where(e_ids < 0, e_lp, torch.full_like(e_lp, -math.inf)), dim=-1)
        e_lp = torch.where(e_ids >= 0, e_lp, torch.full_like(e_lp, -math.inf))
        return log_w, e_ids, e_lp, lost


def mix_topk(mixture, ids, lp, tail, merge):
    """Mapped top-k `[N, k]` (+ tail `[N]` or None) with the mixture's entries: the
    teacher's own entries scaled by w, the extension entries appended, same ids merged
    (`merge`: `VocabMap.merge`)."""
    log_w, e_ids, e_lp, lost = mixture
    out_ids, out_lp = merge(torch.cat([ids, e_ids], -1), torch.cat([lp.double() + log_w[:, None], e_lp], -1))
    if tail is not None:
        tail = torch.logaddexp(tail.double() + log_w, lost).to(tail.dtype)
    return out_ids, out_lp.to(lp.dtype), tail


def mix_full(mixture, lp, student_ids):
    """Mapped full log-probs `[N, M]` over `student_ids` with the mixture's entries added
    into their columns (entries whose id is not among `student_ids` are dropped, as the
    mapping drops unmapped mass)."""
    log_w, e_ids, e_lp, _ = mixture
    out = lp.double() + log_w[:, None]
    sid = student_ids.to(out.device)
    col = torch.searchsorted(sid, e_ids.clamp(min=0)).clamp(max=len(sid) - 1)
    ok = (e_ids >= 0) & (sid[col] == e_ids)
    add = torch.full_like(out, -math.inf)
    for n, k in ok.nonzero().tolist():  # few: the kept extensions
        add[n, col[n, k]] = torch.logaddexp(add[n, col[n, k]], e_lp[n, k])
    return torch.logaddexp(out, add).to(lp.dtype)
