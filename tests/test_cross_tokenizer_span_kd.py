"""`cross_tokenizer.span_kd`: the kd rule inside spans of several tokens.

`span` adds, at each token of a multi-token span, exactly pg's span term log p_S(span) -
log p_T(span) (computed here from independent forwards and byte offsets read from the
vocabularies, not opd's alignment); `masked` adds nothing there; with the student's own tokenizer forced
through alignment both equal the shared-vocabulary path."""

from __future__ import annotations

import math

import pytest
import torch

from opd.config.sections import DataConfig, LossConfig
from opd.data.batch import assemble
from opd.data.encoding import Encoder
from opd.losses.kinds import KINDS
from opd.modeling.hf import completion_hidden, completion_logits, lm_head, token_logprobs
from opd.objectives.fused_tokens import fused_per_token_loss
from opd.objectives.plain import per_token_loss, scored_mask
from opd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher
from opd.teachers.local import LocalTeacher
from real_format import build_tokenizer
from sp_format import build_sp_tokenizer, tiny_model

TEXTS = ["The answer is \\boxed{2024}. 日本語 🙂", "What is 7 plus 5? café 12", "déjà vu 東京 3"]
ROWS = [{"prompt": f"What is {i} plus 2?"} for i in range(len(TEXTS))]
ENDED = (True, False, True)


def student_batch(tok, encoder, *, sampler=False):
    prompts = [encoder.prompt_ids(r["prompt"]) for r in ROWS]
    comps = []
    for text, end in zip(TEXTS, ENDED, strict=True):
        ids = tok(text, add_special_tokens=False).input_ids
        comps.append([*ids, encoder.stop_id] if end else ids)
    batch = assemble(prompts, comps, pad_id=tok.pad_token_id, source="student", rows=ROWS)
    if sampler:
        gen = torch.Generator().manual_seed(0)
        shape = batch.input_ids.shape
        batch.sampler_logprobs = -torch.rand(shape, generator=gen, dtype=torch.float64)
    return batch


def wrapped(inner, s_tok, t_tok, span_kd):
    return CrossTokenizerTeacher(
        inner,
        student_tokenizer=s_tok,
        teacher_tokenizer=t_tok,
        student_encoder=Encoder(s_tok, DataConfig()),
        teacher_encoder=Encoder(t_tok, DataConfig()),
        span_kd=span_kd,
    )


@pytest.fixture(scope="module")
def pair():
    s_tok, t_tok = build_tokenizer(), build_sp_tokenizer()
    student = tiny_model(s_tok, seed=2).double()
    t_model = tiny_model(t_tok, seed=1, hidden=48, scale=4.0).double()
    inner = LocalTeacher(t_model, len(t_tok))
    rules = {r: wrapped(inner, s_tok, t_tok, r) for r in ("masked", "span")}
    return s_tok, t_tok, student, t_model, rules


def summed_values(student, batch, scores, loss):
    logits = completion_logits(student, batch, student.config.vocab_size)
    value, _ = per_token_loss(logits, batch, scores, loss)
    return torch.where(scored_mask(batch, scores), value, 0.0).sum(-1)


# -- the independent reference: byte offsets from the vocabularies, per-model forwards --

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py), written out."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def bpe_bytes(tok, ids):
    return [bytes(BYTE_OF[c] for c in p) for p in tok.convert_ids_to_tokens(ids)]


def sp_bytes(tok, ids):
    out = []
    for p in tok.convert_ids_to_tokens(ids):
        is_byte = p.startswith("<0x") and p.endswith(">") and len(p) == 6
        out.append(bytes([int(p[3:5], 16)]) if is_byte else p.replace("▁", " ").encode())
    return out


def token_lps(model, prompt_ids, comp_ids):
    ids = torch.tensor([prompt_ids + comp_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    P = len(prompt_ids)
    return [float(logp[P - 1 + j, t]) for j, t in enumerate(comp_ids)]


def multi_span_terms(s_pieces, s_lp, t_pieces, t_lp) -> float:
    """Sum over spans of several tokens (between common byte boundaries) of the span term
    at each of its student tokens: (student tokens) x (log p_S(span) - log p_T(span))."""

    def ends(pieces):
        out, at = [], 0
        for p in pieces:
            at += len(p)
            out.append(at)
        return out

    s_end, t_end = ends(s_pieces), ends(t_pieces)
    common = sorted(set(s_end) & set(t_end))
    total, lo = 0.0, 0
    for hi in common:
        s_in = [k for k, e in enumerate(s_end) if lo < e <= hi]
        t_in = [k for k, e in enumerate(t_end) if lo < e <= hi]
        if len(s_in) > 1 or len(t_in) > 1:
            total += len(s_in) * (sum(s_lp[k] for k in s_in) - sum(t_lp[k] for k in t_in))
        lo = hi
    return total


def reference_span_terms(s_tok, t_tok, student, t_model, batch) -> list[float]:
    P, out = batch.prompt_width, []
    for b, (row, text) in enumerate(zip(ROWS, TEXTS, strict=True)):
        s_prompt = batch.input_ids[b, :P][batch.attention_mask[b, :P].bool()].tolist()
        s_comp = batch.input_ids[b, P:][batch.loss_mask()[b]].tolist()
        s_comp = s_comp[:-1] if ENDED[b] else s_comp  # stop <-> end of turn: one to one
        turns = [{"role": "user", "content": row["prompt"]}]
        rendered = t_tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        t_prompt = t_tok(rendered, add_special_tokens=False).input_ids
        t_comp = t_tok(text, add_special_tokens=False).input_ids
        s_pieces, t_pieces = bpe_bytes(s_tok, s_comp), sp_bytes(t_tok, t_comp)
        assert b"".join(s_pieces) == b"".join(t_pieces) == text.encode()
        s_lp, t_lp = token_lps(student, s_prompt, s_comp), token_lps(t_model, t_prompt, t_comp)
        out.append(multi_span_terms(s_pieces, s_lp, t_pieces, t_lp))
    return out


@pytest.mark.parametrize("estimator", ["full", "topk"])
def test_span_rule_adds_exactly_the_span_terms(pair, estimator):
    s_tok, t_tok, student, t_model, rules = pair
    batch = student_batch(s_tok, Encoder(s_tok, DataConfig()))
    loss = LossConfig(objective="kd", estimator=estimator, divergence="reverse_kl", topk=16)
    need, k = ("logits", 0) if estimator == "full" else ("topk", 16)
    masked, span = (rules[r].score(batch, need, k) for r in ("masked", "span"))
    assert masked.span_end is None and (span.span_end >= 0).any()
    got = summed_values(student, batch, span, loss) - summed_values(student, batch, masked, loss)
    want = reference_span_terms(s_tok, t_tok, student, t_model, batch)
    # opd takes the student's log-probs in float32 (modeling.hf.token_logprobs), and a
    # scoring teacher's too: terms of ~70 nats agree to ~1e-6; a dropped or shifted span
    # moves them by more than 1e-2.
    tol = 5e-5
    got = got.detach()
    assert all(abs(w) > 1e-3 for w in want)  # every row has multi-token spans ("2024", 日本語)
    for b, w in enumerate(want):
        assert math.isclose(float(got[b]), w, abs_tol=tol), (b, float(got[b]), w)


def test_span_term_takes_pg_ratio_and_the_fused_path_equals_plain(pair):
    s_tok, _t_tok, student, _t_model, rules = pair
    batch = student_batch(s_tok, Encoder(s_tok, DataConfig()), sampler=True)
    loss = LossConfig(objective="kd", estimator="topk", divergence="forward_kl", topk=16)
    scores = rules["span"].score(batch, "topk", 16)
    logits = completion_logits(student, batch, len(s_tok))
    plain, plain_est = per_token_loss(logits, batch, scores, loss)
    mask = batch.loss_mask()
    in_span = (scores.span_end >= 0) & mask
    # at each token i of a span: -(p_S/q)(y_i) * (log p_T(span) - log p_S(span))
    s_lp = token_logprobs(logits, batch.completion_ids()).detach()  # float32, as opd's
    q = batch.sampler_logprobs[:, batch.prompt_width :]
    last = in_span & (scores.span_end == torch.arange(mask.shape[1]))
    for b, j in last.nonzero().tolist():
        inside = [i for i in range(mask.shape[1]) if in_span[b, i] and scores.span_end[b, i] == j]
        adv = float(scores.token_logprobs[b, j]) - sum(float(s_lp[b, i]) for i in inside)
        for i in inside:
            want = -math.exp(float(s_lp[b, i] - q[b, i])) * adv
            assert math.isclose(float(plain[b, i].detach()), want, rel_tol=1e-5), (b, i)
    # the fused path: values and gradients equal to the plain path's (float32 tiles inside:
    # the tolerances of tests/test_fused_objective.py)
    weight = student.get_output_embeddings().weight
    head = lm_head(student, len(s_tok))
    hidden = completion_hidden(student, batch)[mask]
    fused, fused_est = fused_per_token_loss(hidden, head, batch, scores, loss)
    keep = scored_mask(batch, scores)[mask]
    plain_cells = plain[mask]
    torch.testing.assert_close(fused[keep], plain_cells[keep], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused_est[keep], plain_est[mask][keep], rtol=1e-5, atol=1e-7)
    g_plain = torch.autograd.grad(plain_cells[keep].sum(), weight, retain_graph=True)[0]
    g_fused = torch.autograd.grad(fused[keep].sum(), weight)[0]
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)
    assert g_plain.abs().sum() > 0


@pytest.fixture(scope="module")
def identity():
    tok = build_tokenizer()
    student = tiny_model(tok, seed=2).double()
    teacher = LocalTeacher(tiny_model(tok, seed=1, hidden=48, scale=4.0).double(), len(tok))
    return tok, student, teacher, {r: wrapped(teacher, tok, tok, r) for r in ("masked", "span")}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("estimator", ["topk", "full"])
def test_both_rules_equal_the_shared_path_with_the_students_tokenizer(identity, kind, estimator):
    tok, student, teacher, rules = identity
    batch = student_batch(tok, Encoder(tok, DataConfig()), sampler=True)
    params = {"beta": 0.5} if kind == "jsd" else {}
    loss = LossConfig(objective="kd", estimator=estimator, divergence=kind, topk=8, **params)
    need, k = ("topk", 8) if estimator == "topk" else ("logits", 0)
    logits = completion_logits(student, batch, len(tok))
    ref, _ = per_token_loss(logits, batch, teacher.score(batch, need, k), loss)
    ref = torch.where(batch.loss_mask(), ref, 0.0)
    assert ref.abs().sum() > 0
    for rule, cross in rules.items():
        scores = cross.score(batch, need, k)
        got, _ = per_token_loss(logits, batch, scores, loss)
        got = torch.where(scored_mask(batch, scores), got, 0.0)
        assert scored_mask(batch, scores).equal(batch.loss_mask()), rule
        assert torch.allclose(got.double(), ref.double(), atol=1e-10, rtol=0), rule
