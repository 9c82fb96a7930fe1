"""A teacher with another tokenizer, seen through the student's token grid.

`CrossTokenizerTeacher(inner, ...)` wraps any teacher that scores batches in its own
tokens (local, remote, vLLM). For each student batch it builds the teacher's batch (its
prompt, the student's completion bytes in its tokens: `render`), asks `inner` to score it,
and returns the scores on the student's `[B, L]` completion grid: for `pg` the teacher's
log-prob of the text to each student token's end, per token (`boundary`, the default) or
per span (`grid`, `cross_tokenizer.boundary=token`); for `kd` distributions mapped into
the student's vocabulary at one-to-one positions (and, with `span_kd="span"`, span
log-probs inside multi-token spans). It counts aligned tokens, spans and masked rows per
step (`record`, `stats`).
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from opd.data.batch import SequenceBatch, assemble
from opd.teachers.base import TeacherScores, check_need
from opd.teachers.cross_tokenizer.align import ByteTable, special_pairs
from opd.teachers.cross_tokenizer.boundary import BoundaryMarginal
from opd.teachers.cross_tokenizer.boundary_kd import BoundaryMixture
from opd.teachers.cross_tokenizer.grid import completion_logprobs, span_grids, student_grid_scores
from opd.teachers.cross_tokenizer.render import (
    CompletionAligner,
    RowAlignment,
    teacher_prompt_ids,
)
from opd.teachers.cross_tokenizer.stats import AlignmentStats
from opd.teachers.cross_tokenizer.vocab_map import VocabMap


class CrossTokenizerTeacher:
    """`score(batch, need, topk, temperature)` of a teacher in its own tokens (module doc)."""

    def __init__(
        self,
        inner,
        *,
        student_tokenizer,
        teacher_tokenizer,
        student_encoder,
        teacher_encoder,
        prompt_template: str = "native",
        span_kd: str = "masked",
        boundary_topk: int = 0,
    ):
        """`boundary_topk` > 0: `pg` rewards per student token, each the teacher's log-prob
        of its text whatever follows, read from the teacher's top-k (`boundary`), and kd's
        one-to-one positions after a boundary that leaks read one token earlier
        (`boundary_kd`); 0: per span, the teacher's tokens as cut (`grid`)."""
        if prompt_template not in ("native", "student"):
            raise ValueError(f"cross_tokenizer.prompt_template={prompt_template!r} not in native, student")
        if span_kd not in ("masked", "span"):
            raise ValueError(f"cross_tokenizer.span_kd={span_kd!r} not in masked, span")
        self.span_kd = span_kd
        if boundary_topk < 0:
            raise ValueError(f"cross_tokenizer.boundary_topk={boundary_topk} must be >= 0")
        self.inner = inner
        self.student_tok, self.teacher_tok = student_tokenizer, teacher_tokenizer
        self.s_encoder, self.t_encoder = student_encoder, teacher_encoder
        self.prompt_template = prompt_template
        self.s_table = ByteTable.of(student_tokenizer)
        self.t_table = ByteTable.of(teacher_tokenizer)
        specials = special_pairs(student_tokenizer, teacher_tokenizer)
        self.aligner = CompletionAligner(
            self.s_table,
            self.t_table,
            self._encode,
            student_encoder.end_ids,
            teacher_encoder.stop_id,
            specials,
        )
        self.vocab = VocabMap(
            self.s_table,
            self.t_table,
            student_encoder.stop_id,
            teacher_encoder.stop_id,
            self._student_first,
            specials,
        )
        # the student's own byte table needs no move (every extension is one it merges too)
        self.boundary_topk = boundary_topk if self.s_table.table != self.t_table.table else 0
        self.boundary = BoundaryMarginal(self.s_table, self.t_table) if self.boundary_topk else None
        self.mixture = None  # kd: the one-to-one positions after a boundary that leaks
        if self.boundary is not None:
            self.mixture = BoundaryMixture(self.boundary, self.t_table, self._student_first, self.boundary_topk)
        self.stats = AlignmentStats()
        if hasattr(inner, "submit"):  # a remote teacher: scoring can start without waiting
            self.submit = self._submit

    @property
    def overlaps(self) -> bool:
        """Whether the loop may score a micro-batch ahead beside a backward
        (`opd.run.score_ahead`): as the wrapped teacher says."""
        return bool(getattr(self.inner, "overlaps", False))

    def _student_first(self, text: str) -> int | None:
        ids = self.student_tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
        return ids[0] if ids and self.s_table.get(ids[0]) is not None else None

    def _encode(self, text: str) -> list[int]:
        return self.teacher_tok(text, add_special_tokens=False, split_special_tokens=True).input_ids

    @property
    def model(self):
        return getattr(self.inner, "model", None)

    def teacher_batch(self, batch: SequenceBatch) -> tuple[SequenceBatch, list[RowAlignment]]:
        """The teacher's batch (its prompts, the student's completions in its tokens) and
        each row's alignment."""
        if len(batch.rows) != batch.size:
            raise ValueError(
                "a teacher with another tokenizer renders its prompt from each sequence's "
                f"dataset row; the batch has {len(batch.rows)} rows for {batch.size} sequences"
            )
        P = batch.prompt_width
        ids, real = batch.input_ids.cpu(), batch.attention_mask.bool().cpu()
        prompts, rows = [], []
        for b, (data_row, s_comp) in enumerate(zip(batch.rows, student_completions(batch), strict=True)):
            if "teacher_completion_ids" in data_row:  # a cache's row: the teacher's own ids
                prompts.append(list(data_row["teacher_prompt_ids"]))
                stored = list(data_row["teacher_completion_ids"])
                rows.append(self.aligner.pair(s_comp, stored, self.t_encoder.end_ids))
                continue
            s_prompt = ids[b, :P][real[b, :P]].tolist()
            prompts.append(
                teacher_prompt_ids(
                    self.prompt_template, data_row, s_prompt, self.t_encoder, self.student_tok
                )
            )
            rows.append(self.aligner(s_comp))
        pad = self.teacher_tok.pad_token_id
        pad = pad if pad is not None else self.t_encoder.stop_id
        completions = [r.teacher_ids for r in rows]
        tbatch = assemble(prompts, completions, pad_id=pad, source=batch.source, rows=batch.rows)
        return tbatch, rows

    def step_record(self, sum_all=None) -> dict:
        """Per-step metrics: the wrapped teacher's, and how well this step's batches aligned
        (`stats.AlignmentStats.record`)."""
        inner = self.inner.step_record(sum_all) if hasattr(self.inner, "step_record") else {}
        return {**inner, **self.stats.record()}

    def _inner_request(self, need: str, topk: int) -> tuple[str, int]:
        """What the wrapped teacher is asked: `pg` with the boundary rule needs its top-k."""
        return ("topk", self.boundary_topk) if need == "token" and self.boundary else (need, topk)

    def _on_grid(self, batch, rows, scores: TeacherScores, need: str, temperature: float):
        L = batch.completion_width
        if self.boundary is None:
            return student_grid_scores(rows, L, scores, need, self.vocab, temperature, self.span_kd)
        s_ids = student_completions(batch)
        if need == "token":
            grid, span_end, leaks, ends = self.boundary.scores(rows, s_ids, L, scores)
            self.stats.add_boundary(leaks, ends)
            return TeacherScores(
                token_logprobs=grid, tokens_scored=scores.tokens_scored, span_end=span_end, aligned=span_end >= 0
            )
        mix = lambda pairs: self.mixture(rows, s_ids, scores, pairs, need, temperature)  # noqa: E731
        per_token = self.span_kd == "span" and (need == "logits" or temperature == 1.0)
        span_kd = "masked" if per_token else self.span_kd
        out = student_grid_scores(rows, L, scores, need, self.vocab, temperature, span_kd, mix)
        if per_token:  # inside multi-token spans: pg's per-token terms of the text (`boundary`)
            grid, _, _, _ = self.boundary.scores(rows, s_ids, L, token_scores(rows, scores, need, self.boundary_topk))
            Lt = max([len(r.teacher_ids) for r in rows] + [1])
            inside = span_grids(rows, len(rows), L, Lt, multi_only=True)[0].ge(0).to(grid.device)
            cols = torch.arange(L, device=grid.device).expand(len(rows), -1)
            out.token_logprobs = torch.where(inside, grid, torch.zeros_like(grid))
            out.span_end = torch.where(inside, cols, -1)
            out.aligned = out.aligned | inside
        return out

    @torch.no_grad()
    def score(
        self, batch: SequenceBatch, need: str, topk: int = 0, temperature: float = 1.0
    ) -> TeacherScores:
        check_need(need, topk)
        tbatch, rows = self.teacher_batch(batch)
        self.stats.add(rows, need)
        kw = {"temperature": temperature} if temperature != 1.0 else {}
        scores = self.inner.score(tbatch, *self._inner_request(need, topk), **kw)
        return self._on_grid(batch, rows, scores, need, temperature)

    def _submit(self, batch: SequenceBatch, need: str, topk: int = 0) -> Future:
        """`score` started on the wrapped teacher's `submit`; the future yields the scores
        on the student's grid (the wrapper's `submit` exists only where the inner's does)."""
        check_need(need, topk)
        tbatch, rows = self.teacher_batch(batch)
        self.stats.add(rows, need)
        started, out = self.inner.submit(tbatch, *self._inner_request(need, topk)), Future()

        def done(inner: Future) -> None:
            try:
                with torch.no_grad():
                    out.set_result(self._on_grid(batch, rows, inner.result(), need, 1.0))
            except BaseException as err:  # handed to whoever waits on `out`
                out.set_exception(err)

        started.add_done_callback(done)
        return out

    def after_optimizer_step(self) -> None:
        if hasattr(self.inner, "after_optimizer_step"):
            self.inner.after_optimizer_step()


def student_completions(batch: SequenceBatch) -> list[list[int]]:
    """Each row's completion ids, as the student sampled them (padding dropped)."""
    P = batch.prompt_width
    ids, comp = batch.input_ids[:, P:].cpu(), batch.completion_mask[:, P:].bool().cpu()
    return [ids[b][comp[b]].tolist() for b in range(batch.size)]


def token_scores(rows, scores: TeacherScores, need: str, k: int) -> TeacherScores:
    """The teacher's token log-probs and top-k at temperature 1 from kd scores (its top-k
    asked at temperature 1, or its full logits), for the per-token span terms."""
    if need == "topk":
        return scores
    logp = torch.log_softmax(scores.logits.float(), dim=-1)
    top_lp, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TeacherScores(token_logprobs=completion_logprobs(rows, logp), topk_ids=top_ids, topk_logprobs=top_lp)
