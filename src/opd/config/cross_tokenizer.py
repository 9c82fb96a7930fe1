"""The `cross_tokenizer` section: a teacher whose tokenizer or chat template is not the
student's (`opd.teachers.cross_tokenizer`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from opd.config.sections import _check_choices


@dataclass
class CrossTokenizerConfig:
    """A teacher with another tokenizer or chat template, scored by byte alignment.

    Attributes:
        when: auto: align when the teacher's tokenizer, special tokens or chat template
            differ from the student's (the shared-vocabulary path otherwise) | always: align
            even the student's own tokenizer (checks, comparisons)
        prompt_template: the teacher's prompt: the row rendered by its own chat template
            (native: the teacher as it is used) | the student's rendered prompt text in the
            teacher's tokens (student, as peers do: the teacher reads the student's header)
        teacher_tokenizer: teacher.kind=remote or cached: the teacher's tokenizer (a
            directory or hub id), checked against the server's (opd serve's fingerprint,
            vLLM's /tokenize) or the cache's; a cache's own teacher directory by default
        span_kd: loss.objective=kd (top-k or full): the rule inside spans of several student
            or teacher tokens, where no single-token distributions compare: masked (they add
            nothing; what is compared is the mapped distribution at one-to-one positions
            only) | span (the sampled estimator's exact span term, as loss.objective=pg
            scores it with boundary=token: the span is one action, each of its student
            tokens takes the advantage log p_T(span) - log p_S(span); at temperature 1,
            discount 0, the pg ratio correction)
        boundary: loss.objective=pg: how a row's reward is shared among its student tokens:
            (marginal) each token's reward is the teacher's log-prob of the text up to its
            end whatever follows, minus that up to the previous token: inside a teacher
            token, summed over the teacher's tokens that begin with the text so far; at a
            shared boundary, over the token there and those extending it where the
            student's tokenizer could not merge, the rest ("the text does not go on that
            way") charged to the next token (`opd.teachers.cross_tokenizer.boundary`) |
            (token) per span between shared boundaries, the teacher's tokens as its
            tokenizer cut the text: a standalone `o` where `o7` is a teacher token then
            means "no digit follows", charged to the span that wrote the `o`. A row's sum
            is the same under both. kd: with marginal a one-to-one position after such a
            boundary takes the teacher's next token given the text, read one token earlier
            (`opd.teachers.cross_tokenizer.boundary_kd`); with token, the one given its
            boundary
        boundary_topk: the teacher's top-k read for `boundary=marginal` (the tokens summed
            are those among them; a server must allow this many log-probs)
    """

    when: Literal["auto", "always"] = "auto"
    prompt_template: Literal["native", "student"] = "native"
    teacher_tokenizer: str = ""
    span_kd: Literal["masked", "span"] = "masked"
    boundary: Literal["marginal", "token"] = "marginal"
    boundary_topk: int = 16

    def __post_init__(self):
        _check_choices(self)
        if isinstance(self.boundary_topk, bool) or not isinstance(self.boundary_topk, int) or self.boundary_topk < 1:
            raise ValueError(f"cross_tokenizer.boundary_topk={self.boundary_topk!r} must be an integer >= 1")

    def boundary_k(self, objective: str) -> int:
        """The top-k a teacher with another tokenizer is asked for the boundary rule (0: none)."""
        return self.boundary_topk if objective == "pg" and self.boundary == "marginal" else 0
