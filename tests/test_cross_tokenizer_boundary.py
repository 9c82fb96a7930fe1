"""`cross_tokenizer.boundary=marginal` (opd.teachers.cross_tokenizer.boundary): each span's
teacher log-prob is of its text whatever follows, the boundary's "no merge" term moved to
the next span; checked against a brute force over the teacher's whole vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from opd.config.sections import DataConfig
from opd.data.encoding import Encoder
from opd.teachers.base import TeacherScores
from opd.teachers.cross_tokenizer.align import ByteTable
from opd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher, student_completions
from opd.teachers.local import LocalTeacher
from real_format import build_tokenizer
from sp_format import build_sp_tokenizer, tiny_model
from test_cross_tokenizer_teacher import batch_of

# Texts where the SentencePiece teacher's token before a shared boundary could go on in
# ways the byte-level student's could not (and the other way round).
TEXTS = [
    "The answer is 12. the theory of them",
    "What is 7 plus 5? 2024 then 3",
    "there they the. café 東京",
]
ROWS = [{"prompt": f"What is {i} plus 2?", "completion": t} for i, t in enumerate(TEXTS)]


def wrapped(s_tok, t_tok, t_model, k):
    return CrossTokenizerTeacher(
        LocalTeacher(t_model, len(t_tok)),
        student_tokenizer=s_tok,
        teacher_tokenizer=t_tok,
        student_encoder=Encoder(s_tok, DataConfig()),
        teacher_encoder=Encoder(t_tok, DataConfig()),
        boundary_topk=k,
    )


def brute_force_marginal(logp_V, t_id, s_last, t_table, s_table) -> float:
    """log sum of p(c) over c = t_id and every teacher token extending its bytes by a first
    byte no student token extends `s_last`'s bytes with: Python bytes, the whole vocabulary."""
    mine, last = t_table.get(t_id), s_table.get(s_last)
    student_next = {p[len(last)] for p in s_table.table if p and len(p) > len(last) and p.startswith(last)}
    terms = [float(logp_V[t_id])]
    for c, piece in enumerate(t_table.table):
        extends = c != t_id and piece and len(piece) > len(mine) and piece.startswith(mine)
        if extends and piece[len(mine)] not in student_next:
            terms.append(float(logp_V[c]))
    return math.log(sum(math.exp(x) for x in terms))


def brute_force_prefix(logp_V, partial: bytes, t_table) -> float:
    """log sum of p(c) over every teacher token whose bytes begin with `partial`."""
    terms = [float(logp_V[c]) for c, piece in enumerate(t_table.table) if piece and piece.startswith(partial)]
    return math.log(sum(math.exp(x) for x in terms))


def prefix_values(row, s_ids, logp, s_table, t_table) -> dict[int, float]:
    """The teacher's log-prob of the text up to each student token's end (brute force):
    its tokens before the one that holds that end, plus the marginal over the tokens that
    begin with the bytes of that one so far (at a shared boundary another span follows:
    the token and its extensions the student cannot merge; at the row's end: the token)."""
    t_ids = row.teacher_ids
    t_lp = [float(logp[j, t]) for j, t in enumerate(t_ids)]
    spans = row.alignment.spans
    values = {}
    for n, span in enumerate(spans):
        after = spans[n + 1] if n + 1 < len(spans) else None
        at, j, t_start = 0, span.t0, 0
        for k in range(span.s0, span.s1):
            at += len(s_table.get(s_ids[k]) or b"")
            while j < span.t1 - 1 and t_start + len(t_table.get(t_ids[j]) or b"") <= at:
                t_start += len(t_table.get(t_ids[j]) or b"")
                j += 1
            piece = t_table.get(t_ids[j]) or b""
            if k < span.s1 - 1:  # inside teacher token j
                values[k] = sum(t_lp[:j]) + brute_force_prefix(logp[j], piece[: at - t_start], t_table)
            elif after is not None and after.two_sided and piece:
                last = brute_force_marginal(logp[j], t_ids[j], s_ids[k], t_table, s_table)
                values[k] = sum(t_lp[:j]) + last
            else:
                values[k] = sum(t_lp[: span.t1])
    return values


@pytest.mark.parametrize("pair", ["bpe_student", "sp_student"])
def test_each_student_token_gets_the_teachers_prefix_increment(pair):
    """Every student token's reward is the teacher's log-prob of the text to its end minus
    that to the previous token's end, against a brute force over the whole vocabulary; a
    row's sum is unchanged (the sequence identity holds)."""
    s_tok, t_tok = build_tokenizer(), build_sp_tokenizer()
    if pair == "sp_student":  # a teacher that merges digits the student writes one by one
        s_tok, t_tok = t_tok, s_tok
    t_model = tiny_model(t_tok, seed=1, hidden=48, scale=4.0).double()
    by_token = wrapped(s_tok, t_tok, t_model, 0)
    marginal = wrapped(s_tok, t_tok, t_model, len(t_tok))  # every teacher token: exact
    batch = batch_of(s_tok, Encoder(s_tok, DataConfig()), ROWS, TEXTS)
    ref, got = by_token.score(batch, "token"), marginal.score(batch, "token")
    mask = batch.loss_mask()
    own = torch.where(mask, torch.arange(mask.shape[1]), -1)
    assert got.aligned.equal(ref.aligned) and got.aligned.equal(mask)
    assert got.span_end.equal(own)  # one reward per student token
    # sp_student: spans of several student tokens inside one teacher token (` 12`) are split
    assert ref.span_end.equal(own) == (pair == "bpe_student")
    # a row's sum is unchanged (the teacher scores in float32)
    assert torch.allclose(got.token_logprobs.sum(-1), ref.token_logprobs.sum(-1), atol=1e-4, rtol=0)

    tbatch, rows = marginal.teacher_batch(batch)
    logp = torch.log_softmax(LocalTeacher(t_model, len(t_tok)).score(tbatch, "logits").logits.double(), -1)
    s_table, t_table = ByteTable.of(s_tok), ByteTable.of(t_tok)
    for b, (row, s_ids) in enumerate(zip(rows, student_completions(batch), strict=True)):
        values = prefix_values(row, s_ids, logp[b], s_table, t_table)
        assert sorted(values) == own[b][own[b] >= 0].tolist()
        prev = 0.0
        for k in sorted(values):
            assert math.isclose(float(got.token_logprobs[b, k]), values[k] - prev, abs_tol=3e-5), (b, k)
            prev = values[k]


class FixedTeacher:
    """The same next-token distribution after every prefix, in the teacher's tokens."""

    def __init__(self, logp_V: torch.Tensor):
        self.logp = logp_V

    def score(self, batch, need, topk=0, temperature=1.0):
        ids = batch.completion_ids()
        lp = self.logp.expand(*ids.shape, -1)
        token = lp.gather(-1, ids[..., None]).squeeze(-1)
        if need == "logits":
            return TeacherScores(logits=lp.clone())
        if need == "token":
            return TeacherScores(token_logprobs=token)
        values, top = lp.topk(topk, dim=-1)
        return TeacherScores(token_logprobs=token, topk_ids=top, topk_logprobs=values)


def literal(pieces, pattern):
    """A vocabulary of literal pieces, the text split by `pattern` (the benchmark's kind)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[EOS]", "[UNK]", *pieces])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def o7_pair():
    """A character student, a teacher that also has `o7`, and the teacher's fixed
    next-token distribution (`o7` likely, a bare `o` rare): (s_tok, t_tok, {piece: p}, logp)."""
    chars = list("o7;= ")
    s_tok = literal(chars, r"[\s\S]")
    t_tok = literal([*chars, "o7"], r"o7|[\s\S]")
    p = {"o7": 0.9, "o": 0.01, ";": 0.05, "7": 0.005, "[EOS]": 0.02}
    probs = torch.full((len(t_tok),), 1e-3, dtype=torch.float64)
    for piece, q in p.items():
        probs[t_tok.convert_tokens_to_ids(piece)] = q
    return s_tok, t_tok, p, (probs / probs.sum()).log()


def test_a_standalone_piece_is_charged_to_the_text_that_kept_it_standalone():
    """The benchmark's failure (a standalone `o` where `o7` is one teacher token): with the
    token rule the `o` span carries the teacher's "no digit follows"; with the marginal it
    carries the label's own probability and the span after it is charged instead."""
    s_tok, t_tok, p, logp = o7_pair()

    def scores(k, text="o;"):
        cross = CrossTokenizerTeacher(
            FixedTeacher(logp),
            student_tokenizer=s_tok,
            teacher_tokenizer=t_tok,
            student_encoder=Encoder(s_tok, DataConfig()),
            teacher_encoder=Encoder(t_tok, DataConfig()),
            boundary_topk=k,
        )
        batch = batch_of(s_tok, Encoder(s_tok, DataConfig()), [{"prompt": "=", "completion": ""}], [text], ended=(True,))
        return cross, cross.score(batch, "token").token_logprobs[0].double()

    _, ref = scores(0)
    cross, got = scores(4)
    lp = {piece: float(logp[t_tok.convert_tokens_to_ids(piece)]) for piece in p}
    # spans: `o` | `;` | end of turn, one student and one teacher token each
    assert torch.allclose(ref[:3], torch.tensor([lp["o"], lp[";"], lp["[EOS]"]], dtype=torch.float64))
    both = math.log(math.exp(lp["o"]) + math.exp(lp["o7"]))
    expect = [both, lp[";"] + lp["o"] - both, lp["[EOS]"]]  # `;` has no extension
    assert torch.allclose(got[:3], torch.tensor(expect, dtype=torch.float64), atol=1e-12)
    assert cross.stats.record()["xtok_boundary_moved_frac"] == 0.5  # `o` moved, `;` did not
    # `o7;`: the student's `o` and `7` inside the teacher's `o7` each get their own reward
    _, ref = scores(0, "o7;")
    _, got = scores(4, "o7;")
    assert torch.allclose(ref[:4], torch.tensor([0, lp["o7"], lp[";"], lp["[EOS]"]], dtype=torch.float64))
    expect = [both, lp["o7"] - both, lp[";"], lp["[EOS]"]]
    assert torch.allclose(got[:4], torch.tensor(expect, dtype=torch.float64), atol=1e-12)
    # `oo7;`: the first `o` stands alone (its "no digit" term goes to the next span), and
    # the next span's first student token, the `o` inside `o7`, is the one that pays it
    _, got = scores(4, "oo7;")
    expect = [both, lp["o"], lp["o7"] - both, lp[";"], lp["[EOS]"]]
    assert torch.allclose(got[:5], torch.tensor(expect, dtype=torch.float64), atol=1e-12)
    # the same tokenizer on both sides: nothing to move, the top-k is never asked for
    same = CrossTokenizerTeacher(
        FixedTeacher(logp), student_tokenizer=t_tok, teacher_tokenizer=t_tok,
        student_encoder=Encoder(t_tok, DataConfig()), teacher_encoder=Encoder(t_tok, DataConfig()),
        boundary_topk=4,
    )  # fmt: skip
    assert same.boundary is None and same._inner_request("token", 0) == ("token", 0)


@pytest.mark.parametrize("need", ["topk", "logits"])
def test_kd_after_a_standalone_piece_reads_the_teacher_one_token_earlier(need):
    """At the one-to-one position after a standalone `o` (where `o7` is a teacher token)
    the teacher's distribution given its boundary says "no digit"; the mixture gives the
    next student token given the text: w q_T + p(o7) / M on `7`."""
    s_tok, t_tok, _, logp = o7_pair()
    batch = batch_of(s_tok, Encoder(s_tok, DataConfig()), [{"prompt": "=", "completion": ""}], ["o;"], ended=(True,))

    def mapped(k):
        cross = CrossTokenizerTeacher(
            FixedTeacher(logp), student_tokenizer=s_tok, teacher_tokenizer=t_tok,
            student_encoder=Encoder(s_tok, DataConfig()), teacher_encoder=Encoder(t_tok, DataConfig()),
            boundary_topk=k,
        )  # fmt: skip
        out = cross.score(batch, need, len(t_tok) if need == "topk" else 0)
        dist = {}
        for col in range(3):
            ids, lps = out.topk_ids[0, col], out.topk_logprobs[0, col].double()
            dist[col] = {int(i): float(v.exp()) for i, v in zip(ids, lps, strict=True) if i >= 0}
        return dist

    plain, mixed = mapped(0), mapped(len(t_tok))
    sid = s_tok.convert_tokens_to_ids
    q = {t_tok.convert_ids_to_tokens(i): float(v) for i, v in enumerate(logp.exp())}
    # the teacher's `o7` maps to the student's `o`: the student would begin that text with it
    assert math.isclose(plain[1][sid("o")], q["o"] + q["o7"], rel_tol=1e-6)
    M = q["o"] + q["o7"]
    w = q["o"] / M
    for i, v in plain[1].items():  # after the standalone `o`: scaled by w, `7` gets p(o7) / M
        expect = w * v + (q["o7"] / M if i == sid("7") else 0.0)
        assert math.isclose(mixed[1][i], expect, rel_tol=1e-6, abs_tol=1e-12), (i, mixed[1][i], expect)
    assert mixed[1][sid("7")] > 0.98 and plain[1][sid("7")] < 0.01
    for col in (0, 2):  # no standalone piece before: the mapped distribution, unchanged
        assert mixed[col].keys() == plain[col].keys()
        assert all(math.isclose(mixed[col][i], plain[col][i], rel_tol=1e-6) for i in plain[col])


@pytest.mark.parametrize("need", ["topk", "logits"])
def test_span_kd_inside_multi_token_spans_takes_pgs_per_token_terms(need):
    """kd with `span_kd=span` and the marginal rule: inside spans of several student tokens
    each token carries pg's per-token term (the teacher's log-prob of the text to its end,
    minus to the previous one), the same numbers pg's scores hold there."""
    s_tok, t_tok = build_sp_tokenizer(), build_tokenizer()  # the teacher merges digits
    t_model = tiny_model(t_tok, seed=1, hidden=48, scale=4.0).double()
    cross = wrapped(s_tok, t_tok, t_model, len(t_tok))
    cross.span_kd = "span"
    batch = batch_of(s_tok, Encoder(s_tok, DataConfig()), ROWS, TEXTS)
    pg = cross.score(batch, "token")
    kd = cross.score(batch, need, len(t_tok) if need == "topk" else 0)
    inside = kd.span_end >= 0
    assert inside.any() and (kd.span_end[inside] == torch.nonzero(inside)[:, 1]).all()
    assert torch.allclose(kd.token_logprobs[inside].double(), pg.token_logprobs[inside].double(), atol=2e-5)
    assert not (inside & (kd.topk_ids >= 0).any(-1)).any()  # a position is one or the other
