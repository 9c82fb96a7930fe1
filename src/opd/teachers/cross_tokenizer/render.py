"""What a teacher with another tokenizer reads: its own prompt, the student's exact bytes.

* The prompt is rendered from the dataset row by the teacher's own chat template
  (`cross_tokenizer.prompt_template=native`, the teacher as it is used), or is the student's
  rendered prompt text re-tokenized by the teacher (`student`: what peers do; the teacher
  then reads the student's header, a measured bias).
* The completion is the bytes of the student's completion tokens (never decoded and
  re-encoded on the student side), as text, tokenized by the teacher. A student stop token
  at the end becomes the teacher's end-of-turn token, so both score "the turn ends here".
* A special token inside the completion is paired with the teacher's special of the same
  text or declared role (`align.special_pairs`: `<pad>` with `[PAD]`), scored there by the
  teacher as its own would be by a same-tokenizer teacher, and the text after it goes on.
  A special without a counterpart is read as its literal text (`<|im_start|>` spelt out),
  scored like any other span: a student cannot escape the teacher by writing one.
* Where the bytes cannot round-trip the rest of the row is masked, and counted by reason:
  a token with no text at all (`special_token`), a cut inside a UTF-8 character (or a byte
  that is no UTF-8), a piece of text the teacher's tokenizer does not reproduce byte for
  byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.teachers.cross_tokenizer.align import (
    Alignment,
    ByteTable,
    align,
    matching_prefix,
    valid_utf8_prefix,
)

CUT_REASONS = ("special_token", "utf8", "teacher_bytes")


@dataclass(frozen=True)
class RowAlignment:
    """One row: the teacher's completion ids and the spans to the student's completion."""

    teacher_ids: list[int]
    alignment: Alignment
    student_len: int
    cut: str | None  # why the row's tail is masked (CUT_REASONS), None when all of it aligns

    @property
    def aligned_tokens(self) -> int:
        """Student tokens in spans that hold teacher tokens too (scored by the teacher)."""
        return sum(s.s1 - s.s0 for s in self.alignment.spans if s.two_sided)


class CompletionAligner:
    """Student completion ids -> the teacher's completion ids and the spans between them."""

    def __init__(
        self,
        student_table: ByteTable,
        teacher_table: ByteTable,
        teacher_encode,
        student_stop_ids,
        teacher_end_id: int,
        special_map: dict[int, int] | None = None,
    ):
        """`teacher_encode(text) -> ids`: the teacher tokenizer on plain text (no specials
        added, special-token text split as text). `special_map`: student special id -> the
        teacher's counterpart (`align.special_pairs`); one without is read as its literal text."""
        self.s_table, self.t_table = student_table, teacher_table
        self.encode = teacher_encode
        self.stop_ids = set(student_stop_ids)
        self.t_end = teacher_end_id
        self.specials = dict(special_map or {})

    def __call__(self, student_ids: list[int]) -> RowAlignment:
        """Text segments between special tokens are tokenized by the teacher one by one (as
        its tokenizer splits text at specials); a special with a teacher counterpart is a
        zero-width token on both sides, so the teacher scores its counterpart there and the
        row goes on (leaving it unscored would let a pg student escape the teacher's
        judgement by writing it: `benchmarks/cross_tokenizer.py` saw that collapse). A
        special without a counterpart is its literal text, a span like any other: the
        teacher scores those characters (a mid-row stop included; the stop that ends the
        row is the end of turn)."""
        n, cut, ended = len(student_ids), None, False
        s_lens: list[int] = []
        t_lens: list[int] = []
        t_ids: list[int] = []
        pieces: list[bytes] = []
        for k, i in enumerate([*student_ids, None]):
            ends_row = k == n - 1 and i in self.stop_ids
            piece = None
            if i is not None and not ends_row and i not in self.specials:
                piece = self.s_table.text_of(i)  # text, or an unpaired special's literal text
            if piece is not None:
                pieces.append(piece)
                continue
            cut = self._segment(pieces, s_lens, t_lens, t_ids)
            pieces = []
            if cut is not None or i is None:
                break
            if i in self.specials:
                s_lens.append(0)
                t_lens.append(0)
                t_ids.append(self.specials[i])
                continue
            ended = ends_row
            cut = None if ends_row else "special_token"  # a token with no text at all
            break
        if ended and cut is None:  # the student's stop <-> the teacher's end of turn
            s_lens.append(0)
            t_lens.append(0)
            t_ids.append(self.t_end)
        return RowAlignment(t_ids, align(s_lens, t_lens), n, cut)

    def _segment(self, pieces: list[bytes], s_lens, t_lens, t_ids) -> str | None:
        """One text segment's student pieces, tokenized by the teacher, appended to the
        row's lengths and teacher ids; why the row is cut inside it, None if it is not."""
        raw = b"".join(pieces)
        text = valid_utf8_prefix(raw)
        cut = "utf8" if len(text) < len(raw) else None
        ids = self.encode(text.decode("utf-8")) if text else []
        good = matching_prefix(ids, self.t_table, text)
        if cut is None and (good < len(ids) or sum(len(self.t_table.get(i)) for i in ids) != len(text)):
            cut = "teacher_bytes"
        s_lens.extend(len(p) for p in pieces)
        t_lens.extend(len(self.t_table.get(i)) for i in ids[:good])
        t_ids.extend(ids[:good])
        return cut

    def pair(self, student_ids: list[int], teacher_ids: list[int], teacher_end_ids) -> RowAlignment:
        """Spans between a student completion and given teacher ids of the same text (a
        cache's stored completion, re-tokenized for the student): both sides' bytes up to
        their end token, aligned over their common prefix."""
        s_pieces, s_ended = _pieces(student_ids, self.s_table, self.stop_ids)
        t_pieces, t_ended = _pieces(teacher_ids, self.t_table, set(teacher_end_ids))
        s_raw, t_raw = b"".join(s_pieces), b"".join(t_pieces)
        common = len(_common_prefix(s_raw, t_raw))
        s_keep, t_keep = _within(s_pieces, common), _within(t_pieces, common)
        whole = s_keep == len(student_ids) - s_ended and t_keep == len(teacher_ids) - t_ended
        s_lens = [len(p) for p in s_pieces[:s_keep]]
        t_lens = [len(p) for p in t_pieces[:t_keep]]
        if whole and s_ended and t_ended and s_raw == t_raw:
            s_lens.append(0)
            t_lens.append(0)
        cut = None if whole and s_raw == t_raw and s_ended == t_ended else "teacher_bytes"
        return RowAlignment(list(teacher_ids), align(s_lens, t_lens), len(student_ids), cut)


def _pieces(ids: list[int], table: ByteTable, end_ids) -> tuple[list[bytes], bool]:
    """The bytes of each token up to the first without bytes; whether the last is an end."""
    out = []
    for k, i in enumerate(ids):
        piece = table.get(i)
        if piece is None:
            return out, k == len(ids) - 1 and i in end_ids and k == len(out)
        out.append(piece)
    return out, False


def _common_prefix(a: bytes, b: bytes) -> bytes:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def _within(pieces: list[bytes], limit: int) -> int:
    """How many leading pieces end at or before byte `limit`."""
    at = 0
    for k, p in enumerate(pieces):
        if at + len(p) > limit:
            return k
        at += len(p)
    return len(pieces)


def teacher_prompt_ids(mode: str, row: dict, student_prompt_ids, teacher_encoder, student_tok):
    """The teacher's prompt ids for one row (module doc)."""
    if mode == "native":
        return teacher_encoder.prompt_ids(teacher_encoder.row_prompt(row))
    text = student_tok.decode(student_prompt_ids, skip_special_tokens=False)
    return teacher_encoder.tokenizer(text, add_special_tokens=False).input_ids
