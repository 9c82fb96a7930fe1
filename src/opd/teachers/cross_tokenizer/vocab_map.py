"""The teacher's next-token distribution in the student's vocabulary, by token bytes.

At a position where one student token and one teacher token cover the same bytes after
the same prefix, both models predict "which token comes next" over the same text. A teacher
token maps to the student token of the same bytes; several teacher tokens of the same
bytes (a piece and its `<0xNN>` spelling) merge into one entry (their probabilities add).
A teacher token no student token spells (`b2` where the student has `b` and `2`) maps to
the first token of the student's own tokenization of its text: the student would begin
that text with it, so the teacher's mass on `b2` is mass on "the student's next token is
`b`" (leaving it in the tail would compare it with the student's mass off the teacher's
list, another event). Teacher tokens whose bytes are no text (a byte-fallback piece of a
character) keep their mass in the tail bucket of the sparse divergence
(`opd.losses.sparse`). Special tokens map by their text (`<|im_end|>` to
`<|im_end|>`), the teacher's end-of-turn token to the student's stop token, other specials
by their declared role (`[PAD]` to `<pad>`, `align.special_pairs`).

This is approximate where the vocabularies differ: P_T(" the") in a vocabulary without
" them" also holds " them"'s continuation mass. With the student's own tokenizer every id
maps to itself and the result is the same-tokenizer distribution.

It is biased where the teacher's token before the position could have merged with what
follows: the teacher's prefix then ends at a boundary its tokenizer puts there only when
the next text does not continue the merge, so its next-token distribution is conditioned
on that (the boundary leaks the next token). In `benchmarks/cross_tokenizer.py`'s merged
pair (`a7` one teacher token, `a` `7` two student ones) a student position after a
standalone label `o` gets a mapped P(digit next) of 0.000-0.001 while the teacher, read
at the boundary before `o`, puts 1.0 on a digit following it (and the student 0.99): kd
there teaches "no digit after a label" and the student collapses. Such positions are
counted as one-to-one all the same; with `cross_tokenizer.boundary=marginal` (the
default) their distribution is the mixture of `boundary_kd`, the text's next token read
one teacher token earlier.

Mapped entries: `ids >= 0`; entries whose id is -1 are padding (log-prob -inf), which the
sparse divergences ignore.
"""

from __future__ import annotations

import math

import torch

from opd.teachers.cross_tokenizer.align import ByteTable


class VocabMap:
    def __init__(
        self,
        student: ByteTable,
        teacher: ByteTable,
        student_stop: int,
        teacher_end: int,
        student_first=None,
        special_map: dict[int, int] | None = None,
    ):
        """`student_first(text) -> id | None`: the first token of the student's own
        tokenization of a teacher token's text, for teacher tokens no student token spells
        (module doc); None leaves them to the tail. `special_map` (student special ->
        teacher special, `align.special_pairs`): teacher specials matched neither by text
        nor as the end of turn map back by it (`[PAD]` to `<pad>`)."""
        by_bytes: dict[bytes, int] = {}
        for sid, piece in enumerate(student.table):
            if piece is None:
                continue
            if piece not in by_bytes or by_bytes[piece] in student.fallback:
                by_bytes[piece] = sid  # prefer "A" over its byte spelling <0x41>
        student_specials = {name: i for i, name in (student.specials or {}).items()}
        t2s = []
        for tid, piece in enumerate(teacher.table):
            if piece is not None:
                sid = by_bytes.get(piece, -1)
                if sid < 0 and student_first is not None:
                    sid = student_first_id(student_first, piece)
                t2s.append(sid)
            else:
                t2s.append(student_specials.get((teacher.specials or {}).get(tid), -1))
        if 0 <= teacher_end < len(t2s) and t2s[teacher_end] < 0:
            t2s[teacher_end] = student_stop
        for sid, tid in sorted((special_map or {}).items()):
            if 0 <= tid < len(t2s) and t2s[tid] < 0:
                t2s[tid] = sid
        self.t2s = torch.tensor(t2s, dtype=torch.long)
        # For full distributions: the distinct student ids reached, and each teacher id's group.
        self.student_ids = torch.unique(self.t2s[self.t2s >= 0])
        group = torch.full_like(self.t2s, -1)
        mapped = self.t2s >= 0
        group[mapped] = torch.searchsorted(self.student_ids, self.t2s[mapped])
        self.group = group

    def coverage(self, student_size: int) -> float:
        """Fraction of the student's vocabulary some teacher token maps to."""
        return len(self.student_ids) / max(student_size, 1)

    def topk(self, ids_NK: torch.Tensor, logprobs_NK: torch.Tensor):
        """Teacher top-k entries -> student ids `[N, k]` (-1: padding) and log-probs, entries
        with the same student id merged by log-sum-exp into the first of them."""
        t2s = self.t2s.to(ids_NK.device)
        sid = torch.where(ids_NK >= 0, t2s[ids_NK.clamp(min=0)], -1)
        return self.merge(sid, logprobs_NK)

    @staticmethod
    def merge(sid: torch.Tensor, logprobs: torch.Tensor):
        """Student ids `[N, k]` (-1: none) and log-probs -> the same with entries of one id
        merged by log-sum-exp into the first of them, the others -1 / -inf."""
        lp = torch.where(sid >= 0, logprobs, torch.full_like(logprobs, -math.inf))
        same = (sid[..., :, None] == sid[..., None, :]) & (sid[..., :, None] >= 0)  # [N, k, k]
        k = sid.shape[-1]
        earlier = torch.ones(k, k, dtype=torch.bool, device=sid.device).tril(-1)
        first = ~(same & earlier).any(-1) & (sid >= 0)
        grouped = torch.where(same, lp[..., None, :], torch.full_like(same, -math.inf, dtype=lp.dtype))
        top = grouped.amax(-1, keepdim=True)
        safe = torch.where(top > -math.inf, top, torch.zeros_like(top))
        merged = safe.squeeze(-1) + torch.log(torch.exp(grouped - safe).sum(-1))
        # A single entry keeps its exact value (log(exp(0)) = 0 is exact, but be explicit).
        single = same.sum(-1) == 1
        merged = torch.where(single, lp, merged)
        out_ids = torch.where(first, sid, -1)
        out_lp = torch.where(first, merged, torch.full_like(merged, -math.inf))
        return out_ids, out_lp

    def full(self, logprobs_NV: torch.Tensor):
        """A teacher distribution over its whole vocabulary `[N, Vt]` -> log-probs on
        `self.student_ids` `[N, M]`, groups merged by log-sum-exp."""
        V = logprobs_NV.shape[-1]
        group = self.group[:V].to(logprobs_NV.device)
        keep = group >= 0
        lp, g = logprobs_NV[:, keep], group[keep].expand(logprobs_NV.shape[0], -1)
        M = len(self.student_ids)
        top = torch.full((lp.shape[0], M), -math.inf, dtype=lp.dtype, device=lp.device)
        top = top.scatter_reduce(1, g, lp, reduce="amax", include_self=True)
        safe = torch.where(top > -math.inf, top, torch.zeros_like(top))
        total = torch.zeros_like(top).scatter_add(1, g, torch.exp(lp - safe.gather(1, g)))
        return torch.where(total > 0, safe + torch.log(total), torch.full_like(top, -math.inf))


def student_first_id(student_first, piece: bytes) -> int:
    """The student's first token of `piece` as text; -1 for bytes that are no text (a
    byte-fallback piece of a character) or text the student does not begin with a token."""
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        return -1
    sid = student_first(text) if text else None
    return -1 if sid is None else sid
