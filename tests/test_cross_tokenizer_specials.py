"""A special token inside the student's completion, across tokenizers
(`align.special_pairs`, `render.CompletionAligner`): paired with the teacher's special of the
same text or role, scored by the teacher there as a same-tokenizer teacher scores its own,
and the row goes on. Left unscored (the rest of the row masked, as before) it was a way out
of the teacher's judgement: a pg student from a teacher whose `<unk>` is named `[UNK]` came
to write `<unk>` and `<pad>` in 20-75% of its rows and collapsed (`benchmarks/
cross_tokenizer.py`, `permuted`), where the same teacher with the student's own names gives
`<unk>` about -13 nats."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opd.cli.demo.tiny import build_char_tokenizer
from opd.config.sections import DataConfig, LossConfig
from opd.data.batch import assemble
from opd.data.encoding import Encoder
from opd.losses import distill_advantages
from opd.losses.sampled import span_sums
from opd.modeling.hf import completion_logits, token_logprobs
from opd.teachers.cross_tokenizer.align import special_pairs
from opd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher
from opd.teachers.local import LocalTeacher
from real_format import build_tokenizer
from sp_format import build_sp_tokenizer, tiny_model
from test_cross_tokenizer_eval import wrapped
from test_cross_tokenizer_teacher import ROWS, losses, sequence_logprob

RENAMED = {"<pad>": "[PAD]", "<eos>": "[EOS]", "<unk>": "[UNK]"}


def renamed_char_tokenizer(tok) -> PreTrainedTokenizerFast:
    """The demo's character vocabulary, the same ids, its specials under other names."""
    vocab = {RENAMED.get(t, t): i for t, i in tok.get_vocab().items()}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def test_specials_pair_by_text_then_role_never_an_eos():
    s_tok = build_char_tokenizer()
    t_tok = renamed_char_tokenizer(s_tok)
    ids = s_tok.convert_tokens_to_ids
    assert special_pairs(s_tok, t_tok) == {
        ids("<pad>"): t_tok.convert_tokens_to_ids("[PAD]"),
        ids("<unk>"): t_tok.convert_tokens_to_ids("[UNK]"),
    }  # <eos> is paired by the stop rule, not by role
    bpe, sp = build_tokenizer(), build_sp_tokenizer()
    # Qwen's pad <|endoftext|> and Llama's pad </s> are each their tokenizer's EOS too;
    # <|im_start|> has no counterpart by text or role
    assert special_pairs(bpe, sp) == {}
    assert special_pairs(bpe, bpe) == {i: i for i in bpe.all_special_ids}


def batch_with(tok, enc, comps):
    rows = [{"prompt": f"ODD:a{i}b3\n", "completion": ""} for i in range(len(comps))]
    prompts = [enc.prompt_ids(r["prompt"]) for r in rows]
    return assemble(prompts, comps, pad_id=tok.pad_token_id, source="student", rows=rows)


@pytest.fixture(scope="module")
def renamed():
    s_tok = build_char_tokenizer()
    t_tok = renamed_char_tokenizer(s_tok)
    t_model = tiny_model(t_tok, seed=1, hidden=48, scale=4.0).double()
    cross = wrapped(LocalTeacher(t_model, len(t_tok)), s_tok, t_tok)
    return s_tok, cross.s_encoder, t_model, cross


def test_a_paired_special_is_scored_by_the_teacher_and_the_row_goes_on(renamed):
    s_tok, s_enc, t_model, cross = renamed
    ids = s_tok.convert_tokens_to_ids
    text = s_tok("a1b1", add_special_tokens=False).input_ids
    comps = [
        [*text, ids("<unk>"), *text, ids("<pad>"), *text, s_enc.stop_id],
        [*text, s_enc.stop_id],
    ]
    batch = batch_with(s_tok, s_enc, comps)
    cross.step_record()
    scores = cross.score(batch, "token")
    assert cross.step_record()["xtok_rows_masked"] == 0
    # The vocabularies share ids (only the specials' names differ), so the teacher's own
    # forward over the student's ids is the reference: every token, the specials included.
    P = batch.prompt_width
    for b, comp in enumerate(comps):
        prompt = batch.input_ids[b, :P][batch.attention_mask[b, :P].bool()].tolist()
        seq = torch.tensor([prompt + comp])
        with torch.no_grad():
            logp = torch.log_softmax(t_model(input_ids=seq).logits[0].double(), -1)
        ref = torch.stack([logp[len(prompt) - 1 + j, t] for j, t in enumerate(comp)])
        n = len(comp)
        assert scores.aligned[b, :n].all()
        # 1e-5: the local teacher hands back float32 log-probs
        assert torch.allclose(scores.token_logprobs[b, :n].double(), ref, atol=1e-5, rtol=0)
    at_unk = scores.token_logprobs[0, len(text)]
    assert at_unk < -1.0  # a real judgement, not the 0 of an unscored token


@pytest.mark.parametrize("boundary_topk", [0, 16])
def test_an_unpaired_special_is_read_as_its_text_and_scored(boundary_topk):
    """Qwen's `<|im_start|>` against a Llama-3-style teacher: no counterpart by text or role.
    The teacher reads it spelt out, the row goes on, and the rewards still sum to the
    sequence's log-ratio with the teacher's log-prob of that literal text (a student cannot
    escape the teacher by writing it); per span (`boundary=token`) or per token (the
    marginal rule, which reads the special's bytes as the aligner did)."""
    s_tok, t_tok = build_tokenizer(), build_sp_tokenizer()
    student = tiny_model(s_tok, seed=2).double()
    t_model = tiny_model(t_tok, seed=1, hidden=48, scale=4.0).double()
    cross = wrapped(LocalTeacher(t_model, len(t_tok)), s_tok, t_tok)
    if boundary_topk:
        cross = CrossTokenizerTeacher(
            cross.inner, student_tokenizer=s_tok, teacher_tokenizer=t_tok,
            student_encoder=cross.s_encoder, teacher_encoder=cross.t_encoder, boundary_topk=boundary_topk,
        )  # fmt: skip
    s_enc = cross.s_encoder
    im_start = s_tok.convert_tokens_to_ids("<|im_start|>")
    assert im_start not in cross.aligner.specials
    head, tail = (s_tok(t, add_special_tokens=False).input_ids for t in ("ok 12", " café"))
    row = ROWS[0]
    comp = [*head, im_start, *tail, s_enc.stop_id]
    batch = assemble([s_enc.prompt_ids(row["prompt"])], [comp], pad_id=s_tok.pad_token_id,
                     source="student", rows=[row])  # fmt: skip
    cross.step_record()
    scores = cross.score(batch, "token")
    assert scores.aligned.equal(batch.loss_mask())
    assert cross.step_record().get("xtok_rows_cut_special_token", 0) == 0
    s_lp = token_logprobs(completion_logits(student, batch, len(s_tok)), batch.completion_ids())
    diff = torch.where(scores.aligned, scores.token_logprobs.double() - s_lp.double(), 0.0)
    rewards = span_sums(diff, torch.where(scores.aligned, scores.span_end, -1))
    literal = t_tok("ok 12<|im_start|> café", add_special_tokens=False, split_special_tokens=True)
    t_comp = [*literal.input_ids, t_tok.convert_tokens_to_ids("<|eot_id|>")]
    assert len(t_comp) > len(comp)  # spelt out in several teacher tokens
    turns = [{"role": "user", "content": row["prompt"]}]
    t_prompt = t_tok(t_tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False).input_ids  # fmt: skip
    P = batch.prompt_width
    s_prompt = batch.input_ids[0, :P][batch.attention_mask[0, :P].bool()].tolist()
    want = sequence_logprob(t_model, t_prompt, t_comp) - sequence_logprob(student, s_prompt, comp)
    assert math.isclose(float(rewards[0].sum()), want, abs_tol=1e-4), want


def test_kd_maps_the_teachers_renamed_specials_to_the_students(renamed):
    s_tok, _s_enc, _t_model, cross = renamed
    t2s = cross.vocab.t2s
    for s_name, t_name in RENAMED.items():
        t_id = cross.teacher_tok.convert_tokens_to_ids(t_name)
        assert t2s[t_id] == s_tok.convert_tokens_to_ids(s_name)


@pytest.mark.parametrize("discount", [0.0, 0.9])
def test_the_students_tokenizer_through_alignment_equals_pg_with_a_special_inside(discount):
    tok = build_tokenizer()
    enc = Encoder(tok, DataConfig())
    student = tiny_model(tok, seed=2).double()
    teacher = LocalTeacher(tiny_model(tok, seed=1, hidden=48, scale=4.0).double(), len(tok))
    cross = CrossTokenizerTeacher(
        teacher, student_tokenizer=tok, teacher_tokenizer=tok,
        student_encoder=enc, teacher_encoder=Encoder(tok, DataConfig()),
    )  # fmt: skip
    head, tail = (tok(t, add_special_tokens=False).input_ids for t in ("ok 12", " café"))
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    batch = batch_with(tok, enc, [[*head, im_start, *tail, enc.stop_id], [*tail, enc.stop_id]])
    gen = torch.Generator().manual_seed(0)
    batch.sampler_logprobs = -torch.rand(batch.input_ids.shape, generator=gen, dtype=torch.float64)
    direct, crossed = teacher.score(batch, "token"), cross.score(batch, "token")
    assert crossed.aligned.equal(batch.loss_mask())  # the special and the text after it too
    loss = LossConfig(objective="pg", discount=discount)
    ref_v, _ = losses(student, batch, direct, loss)
    got_v, _ = losses(student, batch, crossed, loss)
    assert torch.allclose(got_v.double(), ref_v.double(), atol=1e-10, rtol=0)
    s_lp = token_logprobs(completion_logits(student, batch, len(tok)), batch.completion_ids())
    mask = batch.loss_mask()
    ref_a = distill_advantages(s_lp.double(), direct.token_logprobs.double(), mask, discount)
    got_a = distill_advantages(
        s_lp.double(), crossed.token_logprobs.double(), crossed.aligned, discount, crossed.span_end
    )
    assert torch.allclose(got_a, ref_a, atol=1e-10, rtol=0) and ref_a[0].abs().sum() > 0
