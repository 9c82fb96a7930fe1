"""`pg` rewards per student token across tokenizers: the teacher's log-prob of the text
to each student token's end, whatever follows (`cross_tokenizer.boundary=marginal`).

With the token rule (`grid`) a span of several student tokens is one action and its
reward is the teacher's log-prob of its tokens. Two things in that are not about the text:

* Inside a span the student's tokens share one reward (the teacher's `o7` against the
  student's `o`, `7`): which of them was wrong is not said.
* A teacher token boundary can say something about the text after it. Where the
  teacher's vocabulary holds `o7`, its tokenizer writes a standalone `o` only when no
  digit follows, so p_T(`o`) is the probability of "`o`, and then no digit", and the span
  that ends there is charged for a choice its tokens did not make
  (`benchmarks/cross_tokenizer_boundary.py` measured -15 nats on a correct label, the
  missing digit after it unpunished).

With `marginal` the teacher's log-prob of the text up to a byte offset inside its token
`t_j` (`m` bytes into it) is, to first order,

    sum_{i<j} log p_T(t_i) + log sum_{c : bytes(c) begins with bytes(t_j)[:m]} p_T(c | t_<j)

and at a span end after `t_j` (another span follows) the sum runs over `t_j` and the
teacher tokens extending it across the boundary by a first byte the student's tokenizer
could not merge there (no student token extends the span's last student token by it):
the boundary leak the student's own boundary does not share. Each student token's reward
is the difference of these values at its end and at the previous token's end, so a row's
sum is unchanged (the sequence identity holds), a standalone `o` is charged to the token
after it, and `o` and `7` inside `o7` each get their own reward. With the student's own
tokenizer every extension is one the student merges too and every span is one token a
side: nothing changes (the wrapper does not even ask for the top-k).

First order (documented approximation): the teacher tokens before `t_j` are held as its
tokenizer cut them and only single tokens at `j` are summed, read from the teacher's
top-k at temperature 1 (`cross_tokenizer.boundary_topk`), so tokens outside the top-k are
missed (the marginal is a lower bound). The student's own boundary terms are not moved
(that needs its distribution at each position: exact where, as in a digit-splitting
student, no student token extends across the boundary).
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch

from opd.teachers.cross_tokenizer.align import ByteTable
from opd.teachers.cross_tokenizer.render import RowAlignment

# Teacher token bytes compared when testing whether one token extends another: tokens of
# this length or longer are never extended here (rare; the boundary keeps its token rule).
WIDTH = 32


def _teacher_bytes(table: ByteTable) -> tuple[torch.Tensor, torch.Tensor]:
    """`[V, WIDTH]` uint8 of each token's leading bytes and `[V]` its full length (0: no
    bytes, a special)."""
    V = len(table)
    data = torch.zeros((V, WIDTH), dtype=torch.uint8)
    lens = torch.zeros(V, dtype=torch.long)
    for i, piece in enumerate(table.table):
        if piece:
            head = piece[:WIDTH]
            data[i, : len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
            lens[i] = len(piece)
    return data, lens


def _student_next_bytes(table: ByteTable) -> torch.Tensor:
    """`[V, 256]` bool: byte `x` is set for token `s` when some student token's bytes are
    `s`'s bytes followed by `x` and more (or nothing more): the student can merge across a
    boundary after `s` when the text goes on with `x`."""
    ids_of: dict[bytes, list[int]] = {}
    for i, piece in enumerate(table.table):
        if piece:
            ids_of.setdefault(piece, []).append(i)
    out = torch.zeros((len(table), 256), dtype=torch.bool)
    rows: list[int] = []
    cols: list[int] = []
    for piece in ids_of:
        for m in range(1, len(piece)):
            for i in ids_of.get(piece[:m], ()):
                rows.append(i)
                cols.append(piece[m])
    if rows:
        out[torch.tensor(rows), torch.tensor(cols)] = True
    return out


def teacher_id_grid(rows: list[RowAlignment], width: int) -> torch.Tensor:
    """`[B, width]` long: each row's teacher completion ids, 0-padded (cut at `width`)."""
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = min(len(row.teacher_ids), width)
        ids[b, :n] = torch.tensor(row.teacher_ids[:n], dtype=torch.long)
    return ids


class BoundaryMarginal:
    """The teacher's `pg` scores on the student's grid under `boundary=marginal` (module
    doc): one reward per student token where the bytes allow. Built once per pair."""

    def __init__(self, student_table: ByteTable, teacher_table: ByteTable):
        self.t_bytes, self.t_lens = _teacher_bytes(teacher_table)
        self.s_next = _student_next_bytes(student_table)
        self.t_len_list = self.t_lens.tolist()
        # as `render.CompletionAligner` reads them: a special without a counterpart is its
        # literal text (a paired one is zero-width, in a span of its own)
        self.s_len_list = [len(student_table.text_of(i) or b"") for i in range(len(student_table))]
        self._on: dict = {}  # device -> the tables there

    def _tables(self, dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The byte tables on `dev`, copied there once (`s_next` is `[V, 256]`: 38 MB at
        Qwen's vocabulary, not to be sent every step)."""
        if dev not in self._on:
            self._on[dev] = (self.t_bytes.to(dev), self.t_lens.to(dev), self.s_next.to(dev))
        return self._on[dev]

    def scores(self, rows: list[RowAlignment], student_ids: list[list[int]], L: int, teacher):
        """(`token_logprobs` `[B, L]`: each unit's teacher log-prob at its last column,
        `span_end` `[B, L]`: that column, -1 where unaligned; the leak moved at each span end
        `[B, Lt]` and where the span ends are) from `teacher`'s scores in its own tokens
        (token log-probs and top-k at temperature 1). A unit is one student token inside a
        span with bytes, a whole span of zero-width tokens."""
        token_lp = teacher.token_logprobs
        Lt = token_lp.shape[1]
        t_ids, s_last = self.positions(rows, student_ids, Lt)
        leak = self._leak(t_ids, s_last, token_lp, teacher.topk_ids, teacher.topk_logprobs)
        incoming = torch.zeros_like(leak)
        incoming[:, 1:] = leak[:, :-1]
        units, queries = self._units(rows, student_ids, Lt)
        inside = self._prefix_marginal(t_ids, token_lp, teacher.topk_ids, teacher.topk_logprobs, queries)
        scored = torch.zeros((len(rows), Lt), dtype=torch.bool)
        for b, row in enumerate(rows):
            for span in row.alignment.spans:
                if span.two_sided:
                    scored[b, span.t0 : min(span.t1, Lt)] = True
        moved = torch.where(scored.to(token_lp.device), token_lp - leak + incoming, torch.zeros_like(token_lp))
        before = torch.nn.functional.pad(moved.double().cumsum(-1), (1, 0)).tolist()  # sum of t < j
        came = incoming.double().tolist()
        grid = torch.zeros((len(rows), L), dtype=torch.float64)
        span_end = torch.full((len(rows), L), -1, dtype=torch.long)
        for b, row_units in enumerate(units):
            prev = 0.0
            for first, last, j, q in row_units:  # q: a boundary inside teacher token j, or None
                value = before[b][j] if q is None else before[b][j] + came[b][j] + inside[q]
                grid[b, last] = value - prev
                span_end[b, first : last + 1] = last
                prev = value
        dev = token_lp.device
        return grid.to(dev, token_lp.dtype), span_end.to(dev), leak, s_last >= 0

    def positions(self, rows, student_ids, Lt):
        """`[B, Lt]`: the teacher's completion ids; at the last teacher token of every
        two-sided span another two-sided span follows, the span's last student token (-1
        elsewhere): the span ends whose boundary term can move."""
        s_last = torch.full((len(rows), Lt), -1, dtype=torch.long)
        for b, row in enumerate(rows):
            for span, after in pairwise(row.alignment.spans):
                if span.two_sided and after.two_sided and span.t1 == after.t0 and span.t1 < Lt:
                    s_last[b, span.t1 - 1] = student_ids[b][span.s1 - 1]
        return teacher_id_grid(rows, Lt), s_last

    def _units(self, rows, student_ids, Lt):
        """Per row, in order, `(first col, last col, j, query)`: a unit ending at a shared
        boundary has the teacher's sum of tokens before `j` (its span's `t1`) as its prefix
        value, query None; one ending inside teacher token `j`, `m` bytes into it, adds the
        marginal `queries[query] = (row, j, m)` (`_prefix_marginal`)."""
        units, queries = [], []
        for b, row in enumerate(rows):
            mine, s_ids, t = [], student_ids[b], row.teacher_ids
            for span in row.alignment.spans:
                if not span.two_sided or span.t1 > Lt:
                    continue
                if sum(self.t_len_list[i] for i in t[span.t0 : span.t1]) == 0:  # zero-width
                    mine.append((span.s0, span.s1 - 1, span.t1, None))
                    continue
                at, j = 0, span.t0
                t_end = self.t_len_list[t[j]]
                for k in range(span.s0, span.s1 - 1):  # boundaries strictly inside the span
                    at += self.s_len_list[s_ids[k]]
                    while t_end <= at and j < span.t1 - 1:
                        j += 1
                        t_end += self.t_len_list[t[j]]
                    mine.append((k, k, j, len(queries)))
                    queries.append((b, j, at - (t_end - self.t_len_list[t[j]])))
                mine.append((span.s1 - 1, span.s1 - 1, span.t1, None))
            units.append(mine)
        return units, queries

    def _prefix_marginal(self, t_ids, token_lp, topk_ids, topk_lp, queries) -> list[float]:
        """For each `(row, j, m)`: log sum of p_T(c) over teacher token `j` itself and its
        top-k tokens that begin with its first `m` bytes (the text so far, whatever follows
        inside the token)."""
        if not queries:
            return []
        dev = token_lp.device
        qb, qj, qm = (torch.tensor(x, device=dev) for x in zip(*queries, strict=True))
        t_bytes, t_lens, _ = self._tables(dev)
        V = t_lens.shape[0]
        tj, cand, cand_lp = t_ids.to(dev)[qb, qj], topk_ids.to(dev)[qb, qj], topk_lp[qb, qj]
        c = cand.clamp(0, V - 1)
        m = qm.clamp(max=WIDTH)[:, None]
        cols = torch.arange(WIDTH, device=dev)
        head = ((t_bytes[c] == t_bytes[tj][:, None, :]) | (cols >= m[..., None])).all(-1)
        keep = head & (cand >= 0) & (cand < V) & (cand != tj[:, None]) & (t_lens[c] >= m)
        lp = token_lp[qb, qj].double()
        others = torch.where(keep, cand_lp.double(), torch.full_like(lp[:, None], -math.inf))
        return torch.logsumexp(torch.cat([lp[:, None], others], dim=-1), dim=-1).tolist()

    def _leak(self, t_ids, s_last, token_lp, topk_ids, topk_lp) -> torch.Tensor:
        """`[B, Lt]` (<= 0): at each movable span end, the teacher's log-prob of its token
        minus the marginal over it and its extensions the student could not merge."""
        _, marginal = self.extensions(t_ids, s_last, token_lp, topk_ids, topk_lp)
        lp = token_lp
        return torch.where(torch.isfinite(lp) & (s_last.to(lp.device) >= 0), lp - marginal, torch.zeros_like(lp))

    def extensions(self, t_ids, s_last, token_lp, cand, cand_lp) -> tuple[torch.Tensor, torch.Tensor]:
        """(`[..., K]` which of the candidates `cand` (the teacher's top-k after the
        prefix before `t_ids`) extend `t_ids` past its end by a first byte the student
        could not merge after its token `s_last` (-1: none there); `[...]` the log of the
        teacher's mass on `t_ids` and those), over any leading shape."""
        dev = token_lp.device
        t_ids, s_last, cand = t_ids.to(dev), s_last.to(dev), cand.to(dev)
        t_bytes, t_lens, s_next = self._tables(dev)
        V = t_lens.shape[0]
        valid = (cand >= 0) & (cand < V) & (cand != t_ids[..., None])
        c = cand.clamp(0, V - 1)
        lt, lc = t_lens[t_ids][..., None], t_lens[c]  # [..., 1], [..., K]
        cols = torch.arange(WIDTH, device=dev)
        same_head = (t_bytes[c] == t_bytes[t_ids][..., None, :]) | (cols >= lt[..., None])
        extends = valid & (lt > 0) & (lt < WIDTH) & (lc > lt) & same_head.all(-1)
        first = t_bytes[c].gather(-1, lt.clamp(max=WIDTH - 1)[..., None].expand(*c.shape, 1))
        merges = s_next[s_last.clamp(min=0)][..., None, :].expand(*c.shape, 256)
        merges = merges.gather(-1, first.long()).squeeze(-1)
        keep = extends & ~merges & (s_last >= 0)[..., None]
        lp = token_lp
        moved = torch.where(keep, cand_lp.to(lp.dtype), torch.full_like(cand_lp, -math.inf, dtype=lp.dtype))
        return keep, torch.logsumexp(torch.cat([lp[..., None], moved], dim=-1), dim=-1)
