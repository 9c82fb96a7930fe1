"""A teacher with another tokenizer (opd.teachers.cross_tokenizer.teacher): equal to the
same-tokenizer path when the tokenizers are the same, and exact span log-probs otherwise."""

from __future__ import annotations

import math

import pytest
import torch

from opd.config.sections import DataConfig, LossConfig
from opd.data.batch import assemble
from opd.data.encoding import Encoder
from opd.losses import distill_advantages
from opd.losses.kinds import KINDS
from opd.losses.sampled import span_sums
from opd.modeling.hf import completion_logits, token_logprobs
from opd.objectives.plain import per_token_loss, scored_mask
from opd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher
from opd.teachers.local import LocalTeacher
from opd.teachers.routing import RoutedTeacher, column_route
from real_format import build_tokenizer
from sp_format import build_sp_tokenizer, tiny_model

TEXTS = [
    "The answer is \\boxed{2024}. 日本語 🙂",
    "What is 7 plus 5? café naïve",
    "résumé 東京 déjà vu 12",
]
ROWS = [{"prompt": f"What is {i} plus 2? 🙂", "completion": t} for i, t in enumerate(TEXTS)]


def batch_of(tok, encoder, rows=ROWS, texts=TEXTS, *, ended=(True, False, True)):
    prompts = [encoder.prompt_ids(r["prompt"]) for r in rows]
    comps = []
    for text, end in zip(texts, ended, strict=True):
        ids = tok(text, add_special_tokens=False).input_ids
        comps.append([*ids, encoder.stop_id] if end else ids)
    batch = assemble(prompts, comps, pad_id=tok.pad_token_id, source="student", rows=rows)
    gen = torch.Generator().manual_seed(0)
    batch.sampler_logprobs = -torch.rand(batch.input_ids.shape, generator=gen, dtype=torch.float64)
    return batch


@pytest.fixture(scope="module")
def same():
    tok = build_tokenizer()
    encoder = Encoder(tok, DataConfig())
    student = tiny_model(tok, seed=2).double()
    teacher = LocalTeacher(tiny_model(tok, seed=1, hidden=48, scale=4.0).double(), len(tok))
    cross = CrossTokenizerTeacher(
        teacher,
        student_tokenizer=tok,
        teacher_tokenizer=tok,
        student_encoder=encoder,
        teacher_encoder=Encoder(tok, DataConfig()),
    )
    return tok, encoder, student, teacher, cross


def losses(student, batch, scores, loss):
    logits = completion_logits(student, batch, student.config.vocab_size)
    value, div = per_token_loss(logits, batch, scores, loss)
    mask = scored_mask(batch, scores)
    return torch.where(mask, value, 0.0), torch.where(mask, div, 0.0)


@pytest.mark.parametrize("discount", [0.0, 0.9])
def test_same_tokenizer_through_alignment_equals_pg(same, discount):
    tok, encoder, student, teacher, cross = same
    batch = batch_of(tok, encoder)
    loss = LossConfig(objective="pg", discount=discount)
    direct, crossed = teacher.score(batch, "token"), cross.score(batch, "token")
    assert crossed.aligned.equal(batch.loss_mask())  # every token its own span
    ref_v, ref_d = losses(student, batch, direct, loss)
    got_v, got_d = losses(student, batch, crossed, loss)
    assert torch.allclose(got_v.double(), ref_v.double(), atol=1e-10, rtol=0)
    assert torch.allclose(got_d.double(), ref_d.double(), atol=1e-10, rtol=0)
    logits = completion_logits(student, batch, len(tok))
    s_lp = token_logprobs(logits, batch.completion_ids()).double()
    mask = batch.loss_mask()
    ref_a = distill_advantages(s_lp, direct.token_logprobs.double(), mask, discount)
    got_a = distill_advantages(
        s_lp, crossed.token_logprobs.double(), crossed.aligned, discount, crossed.span_end
    )
    assert torch.allclose(got_a, ref_a, atol=1e-10, rtol=0) and ref_a.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("estimator", ["topk", "full"])
def test_same_tokenizer_through_alignment_equals_kd(same, kind, estimator):
    tok, encoder, student, teacher, cross = same
    batch = batch_of(tok, encoder)
    params = {"beta": 0.5} if kind == "jsd" else {}
    loss = LossConfig(objective="kd", estimator=estimator, divergence=kind, topk=8, **params)
    need, k = ("topk", 8) if estimator == "topk" else ("logits", 0)
    ref_v, _ = losses(student, batch, teacher.score(batch, need, k), loss)
    got_v, _ = losses(student, batch, cross.score(batch, need, k), loss)
    assert torch.allclose(got_v.double(), ref_v.double(), atol=1e-10, rtol=0)
    assert ref_v.abs().sum() > 0


@pytest.fixture(scope="module")
def crossed():
    s_tok, t_tok = build_tokenizer(), build_sp_tokenizer()
    s_enc, t_enc = Encoder(s_tok, DataConfig()), Encoder(t_tok, DataConfig())
    student = tiny_model(s_tok, seed=2).double()
    t_model = tiny_model(t_tok, seed=1, hidden=48, scale=4.0).double()
    cross = CrossTokenizerTeacher(
        LocalTeacher(t_model, len(t_tok)),
        student_tokenizer=s_tok,
        teacher_tokenizer=t_tok,
        student_encoder=s_enc,
        teacher_encoder=t_enc,
    )
    return s_tok, t_tok, s_enc, student, t_model, cross


def sequence_logprob(model, prompt_ids, completion_ids) -> float:
    ids = torch.tensor([prompt_ids + completion_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    P = len(prompt_ids)
    return sum(float(logp[P - 1 + j, t]) for j, t in enumerate(completion_ids))


def test_rewards_sum_to_sequence_log_ratio(crossed):
    s_tok, t_tok, s_enc, student, t_model, cross = crossed
    batch = batch_of(s_tok, s_enc)
    scores = cross.score(batch, "token")
    assert scores.aligned.equal(batch.loss_mask())  # these texts align completely
    assert (scores.span_end != torch.arange(batch.completion_width)).any()  # multi-token spans
    logits = completion_logits(student, batch, len(s_tok))
    s_lp = token_logprobs(logits, batch.completion_ids()).double()
    # rewards: each span's log-ratio at its last token; advantages: a span is one action,
    # every one of its tokens takes its span's reward
    span_end = torch.where(scores.aligned, scores.span_end, -1)
    diff = torch.where(scores.aligned, scores.token_logprobs.double() - s_lp, 0.0)
    rewards = span_sums(diff, span_end)
    advantages = distill_advantages(
        s_lp, scores.token_logprobs.double(), scores.aligned, 0.0, scores.span_end
    )
    want = torch.where(span_end >= 0, rewards.gather(-1, span_end.clamp(min=0)), 0.0)
    assert torch.equal(advantages, want)
    # discount 0.9: the return from the span's end, for each of the span's tokens
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + 0.9 * running
        returns[:, t] = running
    want9 = torch.where(span_end >= 0, returns.gather(-1, span_end.clamp(min=0)), 0.0)
    got9 = distill_advantages(
        s_lp, scores.token_logprobs.double(), scores.aligned, 0.9, scores.span_end
    )
    assert torch.allclose(got9, want9, atol=1e-12, rtol=0)
    eot = t_tok.convert_tokens_to_ids("<|eot_id|>")
    P = batch.prompt_width
    for b, (row, text) in enumerate(zip(ROWS, TEXTS, strict=True)):
        turns = [{"role": "user", "content": row["prompt"]}]
        t_prompt = t_tok(
            t_tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        ).input_ids
        t_comp = t_tok(text, add_special_tokens=False).input_ids
        s_comp = batch.input_ids[b, P:][batch.loss_mask()[b]].tolist()
        if s_comp[-1] == s_enc.stop_id:
            t_comp = [*t_comp, eot]
        s_prompt = batch.input_ids[b, :P][batch.attention_mask[b, :P].bool()].tolist()
        expected = sequence_logprob(t_model, t_prompt, t_comp) - sequence_logprob(
            student, s_prompt, s_comp
        )
        assert math.isclose(float(rewards[b].sum()), expected, abs_tol=1e-4), (b, expected)


def test_teacher_reads_its_own_prompt_and_the_students_bytes(crossed):
    s_tok, t_tok, s_enc, _student, _t_model, cross = crossed
    batch = batch_of(s_tok, s_enc)
    tbatch, rows = cross.teacher_batch(batch)
    student_specials = {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}
    Pt = tbatch.prompt_width
    for b, row in enumerate(ROWS):
        turns = [{"role": "user", "content": row["prompt"]}]
        own = t_tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        prompt = tbatch.input_ids[b, :Pt][tbatch.attention_mask[b, :Pt].bool()].tolist()
        assert prompt == t_tok(own, add_special_tokens=False).input_ids
        text = t_tok.decode(prompt)
        assert not any(s in text for s in student_specials)
        comp = tbatch.input_ids[b, Pt:][tbatch.loss_mask()[b]].tolist()
        ends = comp[-1] == t_tok.convert_tokens_to_ids("<|eot_id|>")
        assert ends == (b != 1)  # the student's stop became the teacher's end of turn
        assert t_tok.decode(comp[:-1] if ends else comp) == TEXTS[b]
        assert rows[b].cut is None


def test_student_prompt_option_reuses_the_students_text(crossed):
    s_tok, t_tok, s_enc, _student, _t_model, cross = crossed
    alt = CrossTokenizerTeacher(
        cross.inner,
        student_tokenizer=s_tok,
        teacher_tokenizer=t_tok,
        student_encoder=s_enc,
        teacher_encoder=cross.t_encoder,
        prompt_template="student",
    )
    batch = batch_of(s_tok, s_enc)
    tbatch, _ = alt.teacher_batch(batch)
    Pt = tbatch.prompt_width
    prompt = tbatch.input_ids[0, :Pt][tbatch.attention_mask[0, :Pt].bool()].tolist()
    assert t_tok.decode(prompt) == s_tok.decode(s_enc.prompt_ids(ROWS[0]["prompt"]))


def byte_ids(tok, data: bytes) -> list[int]:
    """Student ids of single-byte tokens spelling `data` (a byte-level vocabulary has all)."""
    from opd.teachers.cross_tokenizer.align import BYTE_DECODER

    char = {b: c for c, b in BYTE_DECODER.items()}
    return [tok.convert_tokens_to_ids(char[x]) for x in data]


def test_rows_cut_inside_a_character_are_masked_and_counted_a_special_is_read(crossed):
    s_tok, _t_tok, s_enc, _student, _t_model, cross = crossed
    head = s_tok("ok 12", add_special_tokens=False).input_ids
    emoji = "🙂".encode()
    im_start = s_tok.convert_tokens_to_ids("<|im_start|>")
    comps = [
        head + byte_ids(s_tok, emoji[:2]),  # cut inside 🙂 (max_new_tokens ran out)
        [*head, im_start, *head, s_enc.stop_id],  # an unpaired special: read as its text
        head + byte_ids(s_tok, emoji) + [s_enc.stop_id],  # 🙂 spelled in bytes: complete
    ]
    rows = ROWS
    prompts = [s_enc.prompt_ids(r["prompt"]) for r in rows]
    batch = assemble(prompts, comps, pad_id=s_tok.pad_token_id, source="student", rows=rows)
    cross.step_record()  # reset the counters
    scores = cross.score(batch, "token")
    n = len(head)
    assert scores.aligned[0].tolist()[: n + 2] == [True] * n + [False, False]
    assert scores.aligned[1].tolist()[: 2 * n + 2] == [True] * (2 * n + 2)
    assert scores.aligned[2].tolist()[: n + 5] == [True] * (n + 5)  # emoji span + stop span
    rec = cross.step_record()
    assert rec["xtok_rows_masked"] == 1
    assert rec["xtok_rows_cut_utf8"] == 1 and rec.get("xtok_rows_cut_special_token", 0) == 0
    total = (n + 2) + (2 * n + 2) + (n + 5)  # student completion tokens in the three rows
    assert math.isclose(rec["xtok_aligned_frac"], (n + (2 * n + 2) + n + 5) / total)
    assert cross.step_record()["xtok_rows_masked"] == 0  # per step: counters start again


def test_kd_maps_one_to_one_positions_and_masks_the_rest(crossed):
    s_tok, _t_tok, s_enc, _student, _t_model, cross = crossed
    batch = batch_of(s_tok, s_enc)
    scores = cross.score(batch, "topk", 16)
    _, rows = cross.teacher_batch(batch)
    for b, row in enumerate(rows):
        ones = {s.s0 for s in row.alignment.spans if s.one_to_one}
        multi = {i for s in row.alignment.spans if not s.one_to_one for i in range(s.s0, s.s1)}
        assert multi and ones  # "2024" is 1 + 3 student tokens against 4 teacher tokens
        assert {i for i in range(batch.completion_width) if scores.aligned[b, i]} == ones
    valid = scores.topk_ids >= 0
    assert (valid.any(-1) == scores.aligned).all()  # each aligned position maps some mass
    mass = torch.logsumexp(scores.topk_logprobs.double(), -1)[scores.aligned]
    assert (mass <= 1e-9).all()  # unmapped teacher mass stays out (the tail)
    # each kept id is unique per position (collisions merged)
    ids = scores.topk_ids[scores.aligned]
    for row_ids in ids:
        kept = row_ids[row_ids >= 0].tolist()
        assert len(kept) == len(set(kept))


def test_collisions_merge_and_unmapped_mass_goes_to_the_tail(crossed):
    s_tok, t_tok, _s_enc, _student, _t_model, cross = crossed
    vm = cross.vocab
    a_piece, a_byte = t_tok.convert_tokens_to_ids("A"), t_tok.convert_tokens_to_ids("<0x41>")
    unk = t_tok.convert_tokens_to_ids("<unk>")
    s_a = s_tok.convert_tokens_to_ids("A")
    ids = torch.tensor([[a_piece, unk, a_byte]])
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.1]], dtype=torch.float64))
    out_ids, out_lp = vm.topk(ids, lp)
    assert out_ids.tolist() == [[s_a, -1, -1]]
    assert math.isclose(float(out_lp[0, 0].exp()), 0.6, rel_tol=1e-12)
    full = torch.full((1, len(t_tok)), -math.inf, dtype=torch.float64)
    full[0, a_piece], full[0, a_byte], full[0, unk] = math.log(0.5), math.log(0.1), math.log(0.4)
    mapped = vm.full(full)
    where = int((vm.student_ids == s_a).nonzero())
    assert math.isclose(float(mapped[0, where].exp()), 0.6, rel_tol=1e-12)
    assert math.isclose(float(mapped.exp().sum()), 0.6, rel_tol=1e-12)


@pytest.mark.parametrize("need", ["token", "topk"])
def test_routed_rows_keep_their_teachers_spans(crossed, need):
    """Several teachers, one of another tokenizer: each row's loss is its own teacher's
    (the routed scores keep `aligned` and `span_end`, whole rows for the other teacher)."""
    s_tok, t_tok, s_enc, student, _t_model, cross = crossed
    spans = CrossTokenizerTeacher(
        cross.inner, student_tokenizer=s_tok, teacher_tokenizer=t_tok, student_encoder=s_enc,
        teacher_encoder=cross.t_encoder, span_kd="span",
    )  # fmt: skip
    same = LocalTeacher(tiny_model(s_tok, seed=3, hidden=48, scale=4.0).double(), len(s_tok))
    rows = [{**r, "domain": d} for r, d in zip(ROWS, ["x", "y", "x"], strict=True)]
    batch = batch_of(s_tok, s_enc, rows=rows)
    teachers = {"cross": spans, "same": same}
    route = column_route("domain", {"x": "cross", "y": "same"}, "cross", list(teachers))
    k = 16 if need == "topk" else 0
    loss = (
        LossConfig(objective="pg", discount=0.9)
        if need == "token"
        else LossConfig(objective="kd", estimator="topk", divergence="reverse_kl", topk=k)
    )
    got = RoutedTeacher(teachers, route).score(batch, need, k)
    assert got.aligned is not None and got.span_end is not None
    assert got.aligned[1].all()
    own = torch.arange(batch.completion_width) if need == "token" else torch.full_like(got.span_end[1], -1)
    assert got.span_end[1].equal(own)
    routed_v, _ = losses(student, batch, got, loss)
    for name, want_rows in (("cross", [0, 2]), ("same", [1])):
        want_v, _ = losses(student, batch, teachers[name].score(batch, need, k), loss)
        for r in want_rows:
            assert math.isclose(
                float(routed_v[r].sum()), float(want_v[r].sum()), rel_tol=1e-6, abs_tol=1e-6
            ), (name, r)


def test_a_teacher_token_the_student_lacks_maps_to_the_students_first_token(crossed):
    """`b2`-like teacher tokens (bytes no student token spells) count as the student's first
    token of their text, not as tail mass (which would be another event)."""
    s_tok, t_tok, _s_enc, _student, _t_model, cross = crossed
    vm, s_table = cross.vocab, cross.s_table
    student_bytes = {p for p in s_table.table if p is not None}
    lacking = []
    for tid, piece in enumerate(cross.t_table.table):
        if piece is None or piece in student_bytes:
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            assert int(vm.t2s[tid]) == -1  # a byte-fallback piece: no text, the tail
            continue
        first = s_tok(text, add_special_tokens=False).input_ids[0]
        assert int(vm.t2s[tid]) == first, (t_tok.convert_ids_to_tokens(tid), text)
        lacking.append((tid, first))
    assert len(lacking) >= 5  # the pair really has such tokens
    (tid, first), (tid2, _) = lacking[0], lacking[1]
    full = torch.full((1, len(t_tok)), -math.inf, dtype=torch.float64)
    full[0, tid], full[0, tid2] = math.log(0.7), math.log(0.3)
    mapped = vm.full(full)
    where = int((vm.student_ids == first).nonzero())
    assert float(mapped[0, where].exp()) >= 0.7 - 1e-12
    assert math.isclose(float(mapped.exp().sum()), 1.0, rel_tol=1e-12)  # nothing left to the tail
