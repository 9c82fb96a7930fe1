"""How long a training row is in the tokens of a teacher with another tokenizer: what a
teacher server's `max_seq_len` must hold (checked before the run, `teachers.checks`).

The teacher reads its own rendering of the row's prompt (`render.teacher_prompt_ids`: its
chat template, not cut) and the student's completion bytes in its tokens. A dataset
completion is known: the bytes of the student's ids for it (cut at
`data.max_completion_tokens`) in the teacher's tokens, plus its end of turn. A sampled one
is not: `sampling.max_new_tokens` student tokens are counted as that many times the row's
own ratio of teacher to student tokens (on its completion text, else its prompt text), an
estimate the error says is one. A finer teacher tokenizer (SentencePiece byte fallback: one
token per byte of a CJK character) is caught here, naming the row, not by the server's
refusal in the middle of the run.

Torch-free (tokenizers only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from opd.data.encoding import Encoder, is_conversation


@dataclass(frozen=True)
class RowLength:
    row: int  # index in data.train
    prompt: int  # teacher tokens of its prompt
    completion: int  # teacher tokens of its completion (an estimate when `sampled`)
    sampled: bool
    ratio: float  # teacher / student tokens on the row's text

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def _text(encoder: Encoder, row: dict) -> str:
    """The row's completion text if it has one, else its prompt's text."""
    try:
        return encoder.row_completion(row)
    except (KeyError, IndexError, TypeError):
        prompt = encoder.row_prompt(row)
        if is_conversation(prompt):
            return "\n".join(str(m.get("content", "")) for m in prompt)
        return str(prompt)


def longest_teacher_row(
    config, rows: list[dict], student_tok, teacher_tok, *, sampled: bool, dataset: bool
) -> RowLength | None:
    """The row that is longest in the teacher's tokens (module doc); None without rows the
    run keeps. `sampled` / `dataset`: whether student samples / dataset completions reach
    the teacher."""
    data = config.data
    s_enc = Encoder(student_tok, data)
    uncut = replace(data, max_prompt_tokens=max(data.max_prompt_tokens, 1 << 20))  # as `build`
    t_enc = Encoder(teacher_tok, uncut)

    def count(tok, text: str) -> int:
        return len(tok(text, add_special_tokens=False, split_special_tokens=True).input_ids)

    worst = None
    for i, row in enumerate(rows):
        s_prompt, _ = s_enc.fit_prompt(s_enc.row_prompt(row))
        if s_prompt is None:
            continue  # the run leaves this row out
        if config.cross_tokenizer.prompt_template == "native":
            prompt = len(t_enc.prompt_ids(t_enc.row_prompt(row)))
        else:
            prompt = count(teacher_tok, student_tok.decode(s_prompt, skip_special_tokens=False))
        text = _text(s_enc, row)
        ratio = count(teacher_tok, text) / max(count(student_tok, text), 1)
        completion = 0
        if dataset:
            try:
                ids = s_enc.completion_ids(s_enc.row_completion(row))
            except (KeyError, IndexError, TypeError):
                ids = []
            ended = bool(ids) and ids[-1] in s_enc.end_ids
            body = student_tok.decode(ids[:-1] if ended else ids, skip_special_tokens=False)
            completion = count(teacher_tok, body) + int(ended)
        if sampled:
            completion = max(completion, math.ceil(config.sampling.max_new_tokens * ratio) + 1)
        one = RowLength(i, prompt, completion, sampled, ratio)
        if worst is None or one.total > worst.total:
            worst = one
    return worst


def too_long_message(url: str, limit: int, worst: RowLength, config) -> str:
    part = (
        f"about {worst.completion} for sampling.max_new_tokens={config.sampling.max_new_tokens} "
        f"student tokens at this row's {worst.ratio:.2f} teacher tokens per student token"
        if worst.sampled
        else f"{worst.completion} for its completion"
    )
    return (
        f"teacher server {url} scores sequences of at most {limit} tokens (its --max-seq-len) "
        f"but row {worst.row} of data.train={config.data.train} takes {worst.total} in the "
        f"teacher's tokenizer ({config.cross_tokenizer.teacher_tokenizer}): {worst.prompt} for "
        f"its prompt as the teacher renders it, {part}; shorten the row or "
        "sampling.max_new_tokens, or restart the server with a larger --max-seq-len"
    )
