"""Token bytes and spans: where two tokenizations of the same text share a boundary.

Every token of a byte-level BPE (GPT-2, Qwen, Llama 3) or SentencePiece-style (`▁` for a
space, `<0xNN>` byte fallback: Llama 2, Gemma) tokenizer stands for a fixed byte string,
so a token sequence is a byte string cut at token boundaries. Two tokenizations of the
same bytes agree at every offset where both have a boundary; between two such offsets lies
a *span*: a run of student tokens and a run of teacher tokens covering the same bytes
after the same prefix. Spans partition both sides. By the chain rule each model's summed
log-prob over a span's tokens is its log-prob of the span's text given the shared prefix,
so span log-probs compare exactly (`opd.teachers.cross_tokenizer`).

Special tokens (BOS, end of turn) stand for no bytes: `None` in a byte table. `align`
takes byte lengths, 0 for such a zero-width token; zero-width tokens at one offset form a
span of their own, paired with the other side's zero-width tokens there (the student's EOS
with the teacher's end of turn) or with nothing (a BOS on one side only).

Pure Python, no torch: tables are built once per tokenizer, alignment once per row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    byte_for, extra = {}, 0
    for b in range(256):
        if b in printable:
            byte_for[chr(b)] = b
        else:
            byte_for[chr(256 + extra)] = b
            extra += 1
    return byte_for


BYTE_DECODER = _gpt2_byte_decoder()


def tokenizer_style(tokenizer) -> str:
    """'byte_level' | 'sentencepiece' | 'literal' | 'unknown', read from the fast tokenizer:
    a ByteLevel decoder; a Metaspace or `▁` replacement or ByteFallback decoder; a word-level
    vocabulary decoded by concatenation (a character vocabulary: each token is its text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "unknown"
    spec = json.loads(backend.to_str())
    decoder = json.dumps(spec.get("decoder"), ensure_ascii=False)
    if "ByteLevel" in decoder:
        return "byte_level"
    if "Metaspace" in decoder or "ByteFallback" in decoder or "▁" in decoder:
        return "sentencepiece"
    if spec.get("model", {}).get("type") == "WordLevel" and spec.get("decoder") in (
        None,
        {"type": "Fuse"},
    ):
        return "literal"
    return "unknown"


def special_token_ids(tokenizer) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}


# Roles a special token can be paired across tokenizers by (not eos: the end of a turn is
# paired by the stop rule, and "eos" means end of text in a base vocabulary, end of turn in
# an instruct one).
PAIRED_ROLES = ("pad_token", "unk_token", "bos_token", "sep_token", "cls_token", "mask_token")


def special_pairs(student_tok, teacher_tok) -> dict[int, int]:
    """Student special id -> the teacher's special of the same text (`<|im_start|>`), else of
    the same declared role (`pad_token`, `unk_token`, ...: `PAIRED_ROLES`; not a token that
    is also its tokenizer's EOS); specials with neither are left out. Both are non-text tokens that play the same part, so a student
    that writes one mid-completion is scored by the teacher's log-prob of its counterpart
    (`render.CompletionAligner`), as the same-tokenizer path scores its own."""
    s_ids, t_ids = special_token_ids(student_tok), special_token_ids(teacher_tok)
    t_by_text = {teacher_tok.convert_ids_to_tokens(i): i for i in sorted(t_ids)}

    def by_role(tok, ids) -> dict[str, int]:  # a role's token, unless it ends text too
        named = tok.special_tokens_map
        found = {r: tok.convert_tokens_to_ids(named[r]) for r in PAIRED_ROLES if isinstance(named.get(r), str)}
        return {r: i for r, i in found.items() if i in ids and i != tok.eos_token_id}

    s_roles, t_roles = by_role(student_tok, s_ids), by_role(teacher_tok, t_ids)
    out = {}
    for i in sorted(s_ids):
        j = t_by_text.get(student_tok.convert_ids_to_tokens(i))
        for role in PAIRED_ROLES:
            if j is None and s_roles.get(role) == i:
                j = t_roles.get(role)
        if j is not None:
            out[i] = j
    return out


def piece_bytes(piece: str, style: str) -> bytes | None:
    """The bytes one vocabulary entry stands for, None when it has no byte reading."""
    if style == "byte_level":
        try:
            return bytes(BYTE_DECODER[c] for c in piece)
        except KeyError:
            return None
    if style == "sentencepiece":
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")
    if style == "literal":
        return piece.encode("utf-8")
    return None


@dataclass(frozen=True)
class ByteTable:
    """`table[id]`: the bytes token `id` stands for; None for special tokens and entries
    without a byte reading (they never align)."""

    table: tuple[bytes | None, ...]
    style: str
    fallback: frozenset[int] = frozenset()  # `<0xNN>` byte-fallback pieces
    specials: dict[int, str] | None = None  # special id -> its text (`<|im_end|>`)

    @classmethod
    def of(cls, tokenizer) -> ByteTable:
        style = tokenizer_style(tokenizer)
        if style == "unknown":
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} is neither byte-level "
                "BPE, SentencePiece-style nor a word-level vocabulary of literal text (no "
                "ByteLevel / Metaspace / ByteFallback decoder): its tokens have no byte "
                "reading to align by"
            )
        specials = special_token_ids(tokenizer)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        table, fallback = [], set()
        for i, piece in enumerate(pieces):
            if i in specials or piece is None:
                table.append(None)
            elif i in added:  # a normal added token is matched as its literal text
                table.append(str(added[i].content).encode("utf-8"))
            else:
                table.append(piece_bytes(piece, style))
                if style == "sentencepiece" and _BYTE_TOKEN.fullmatch(piece):
                    fallback.add(i)
        names = {i: pieces[i] for i in specials if 0 <= i < len(pieces) and pieces[i]}
        return cls(tuple(table), style, frozenset(fallback), names)

    def __len__(self) -> int:
        return len(self.table)

    def get(self, token_id: int) -> bytes | None:
        return self.table[token_id] if 0 <= token_id < len(self.table) else None

    def text_of(self, token_id: int) -> bytes | None:
        """The token's bytes, or a special's literal text (`<|im_start|>` spelt out): how a
        special the other side has no counterpart for is read."""
        piece = self.get(token_id)
        if piece is None and self.specials and token_id in self.specials:
            return self.specials[token_id].encode("utf-8")
        return piece


@dataclass(frozen=True)
class Span:
    """Student tokens [s0, s1) and teacher tokens [t0, t1), covering the same bytes."""

    s0: int
    s1: int
    t0: int
    t1: int

    @property
    def one_to_one(self) -> bool:
        return self.s1 - self.s0 == 1 and self.t1 - self.t0 == 1

    @property
    def two_sided(self) -> bool:
        return self.s1 > self.s0 and self.t1 > self.t0


@dataclass(frozen=True)
class Alignment:
    """Spans over the aligned prefixes: student tokens [0, s_end), teacher [0, t_end).
    Tokens past them cover bytes the other side does not reach at a shared boundary."""

    spans: tuple[Span, ...]
    s_end: int
    t_end: int


def align(s_lens: list[int], t_lens: list[int]) -> Alignment:
    """Spans between common byte boundaries of two token sequences, given each token's
    byte length (0: zero-width). Both byte streams are assumed equal up to the shorter
    one's length (the caller checks the bytes); spans stop at the last shared boundary."""
    spans: list[Span] = []
    i = j = 0
    ns, nt = len(s_lens), len(t_lens)
    while i < ns or j < nt:
        if (i < ns and s_lens[i] == 0) or (j < nt and t_lens[j] == 0):
            i0, j0 = i, j  # zero-width tokens at this offset: a span of their own
            while i < ns and s_lens[i] == 0:
                i += 1
            while j < nt and t_lens[j] == 0:
                j += 1
            spans.append(Span(i0, i, j0, j))
            continue
        if i == ns or j == nt:
            break
        i0, j0 = i, j
        bs, bt = s_lens[i], t_lens[j]
        i, j = i + 1, j + 1
        while bs != bt:
            if bs < bt:
                if i == ns:
                    break
                bs, i = bs + s_lens[i], i + 1
            else:
                if j == nt:
                    break
                bt, j = bt + t_lens[j], j + 1
        if bs != bt:  # one side ran out inside a span: no shared boundary after i0 / j0
            i, j = i0, j0
            break
        spans.append(Span(i0, i, j0, j))
    return Alignment(tuple(spans), i, j)


def valid_utf8_prefix(data: bytes) -> bytes:
    """The longest prefix of `data` that is valid UTF-8 (a cut character or a stray byte
    ends it)."""
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError as err:
        return data[: err.start]


def matching_prefix(ids: list[int], table: ByteTable, text: bytes) -> int:
    """How many of `ids` reproduce `text` from its start, token by token (a token without
    bytes, or whose bytes differ from the text there, ends the match)."""
    at = 0
    for n, i in enumerate(ids):
        piece = table.get(i)
        if piece is None or text[at : at + len(piece)] != piece:
            return n
        at += len(piece)
    return len(ids)
