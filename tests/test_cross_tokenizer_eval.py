"""`opd eval --teacher` with a teacher of another tokenizer: the exposure-bias probe at the
aligned positions (opd.evaluation.cross_divergence)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from opd.cli.main import main as cli_main
from opd.config.parse import config_from_dict
from opd.config.sections import DataConfig, LossConfig
from opd.data.batch import assemble
from opd.data.encoding import Encoder
from opd.evaluation.cross_divergence import cross_divergences
from opd.evaluation.divergence import mean_divergences
from opd.modeling.hf import completion_logits, token_logprobs
from opd.objectives.plain import per_token_loss, scored_mask
from opd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher
from opd.teachers.local import LocalTeacher
from real_format import build_tokenizer, write_data
from sp_format import build_sp_tokenizer, save_cross_pair, tiny_model

KINDS = ("forward_kl", "reverse_kl", "tvd")
TEXTS = ["The answer is \\boxed{2024}. 日本語 🙂", "What is 7 plus 5? café 12", "déjà vu 東京 3"]
ROWS = [{"prompt": f"What is {i} plus 2?"} for i in range(len(TEXTS))]


def samples(tok, encoder):
    out = []
    for row, text in zip(ROWS, TEXTS, strict=True):
        comp = [*tok(text, add_special_tokens=False).input_ids, encoder.stop_id]
        out.append((encoder.prompt_ids(row["prompt"]), comp, row))
    return out


def wrapped(inner, s_tok, t_tok):
    return CrossTokenizerTeacher(
        inner,
        student_tokenizer=s_tok,
        teacher_tokenizer=t_tok,
        student_encoder=Encoder(s_tok, DataConfig()),
        teacher_encoder=Encoder(t_tok, DataConfig()),
    )


def test_the_students_tokenizer_through_the_probe_equals_the_shared_probe():
    tok = build_tokenizer()
    encoder = Encoder(tok, DataConfig())
    student = tiny_model(tok, seed=2)  # float32: mean_divergences' own grid is float32
    teacher = LocalTeacher(tiny_model(tok, seed=1, hidden=48, scale=4.0), len(tok))
    got = cross_divergences(
        student, wrapped(teacher, tok, tok), samples(tok, encoder), pad_id=tok.pad_token_id,
        vocab_size=len(tok), kinds=KINDS, batch_size=2,
    )  # fmt: skip
    prompts, comps, _ = zip(*samples(tok, encoder), strict=True)
    want = mean_divergences(
        student, teacher, prompts, comps, pad_id=tok.pad_token_id, vocab_size=len(tok),
        kinds=KINDS,
    )  # fmt: skip
    assert got["one_to_one_frac"] == got["aligned_frac"] == 1.0 and got["rows_cut"] == 0
    for kind in KINDS:
        assert math.isclose(got["mapped"][kind], want[kind], rel_tol=1e-5), kind
        assert want[kind] > 1e-3
    # the sequence figure: the mean sampled-token log-ratio over the tokens
    batch = assemble(list(prompts), list(comps), pad_id=tok.pad_token_id)
    with torch.no_grad():
        s_lp = token_logprobs(completion_logits(student, batch, len(tok)), batch.completion_ids())
    t_lp = teacher.score(batch, "token").token_logprobs
    mask = batch.loss_mask()
    direct = float((s_lp.double() - t_lp.double())[mask].mean())
    assert math.isclose(got["log_ratio"], direct, abs_tol=1e-6)  # float32 models


@pytest.fixture(scope="module")
def pair():
    s_tok, t_tok = build_tokenizer(), build_sp_tokenizer()
    student = tiny_model(s_tok, seed=2).double()
    t_model = tiny_model(t_tok, seed=1, hidden=48, scale=4.0).double()
    return s_tok, t_tok, student, t_model, wrapped(LocalTeacher(t_model, len(t_tok)), s_tok, t_tok)


def sequence_logprob(model, prompt_ids, completion_ids) -> float:
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    P = len(prompt_ids)
    return sum(float(logp[P - 1 + j, t]) for j, t in enumerate(completion_ids))


def test_across_tokenizers_the_probe_is_trainings_kd_and_the_exact_log_ratio(pair):
    s_tok, t_tok, student, t_model, cross = pair
    s_enc = Encoder(s_tok, DataConfig())
    sample = samples(s_tok, s_enc)
    got = cross_divergences(
        student, cross, sample, pad_id=s_tok.pad_token_id, vocab_size=len(s_tok), kinds=KINDS,
        batch_size=2,
    )  # fmt: skip
    assert 0 < got["one_to_one_frac"] < got["aligned_frac"] == 1.0
    # per kind: training's full-kd divergence (mapped) at the one-to-one positions
    prompts, comps, rows = zip(*sample, strict=True)
    batch = assemble(list(prompts), list(comps), pad_id=s_tok.pad_token_id, rows=list(rows))
    scores = cross.score(batch, "logits")
    with torch.no_grad():
        logits = completion_logits(student, batch, len(s_tok))
    for kind in KINDS:
        loss = LossConfig(objective="kd", estimator="full", divergence=kind)
        value, _ = per_token_loss(logits, batch, scores, loss)
        want = float(value[scored_mask(batch, scores)].mean())
        assert math.isclose(got["mapped"][kind], want, rel_tol=1e-5), kind
    # the sequence figure: log p_S(y) - log p_T(text) from independent forwards, per token
    eot = t_tok.convert_tokens_to_ids("<|eot_id|>")
    total, tokens = 0.0, 0
    for (s_prompt, s_comp, row), text in zip(sample, TEXTS, strict=True):
        turns = [{"role": "user", "content": row["prompt"]}]
        rendered = t_tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        t_prompt = t_tok(rendered, add_special_tokens=False).input_ids
        t_comp = [*t_tok(text, add_special_tokens=False).input_ids, eot]
        total += sequence_logprob(student, s_prompt, s_comp)
        total -= sequence_logprob(t_model, t_prompt, t_comp)
        tokens += len(s_comp)
    assert math.isclose(got["log_ratio"], total / tokens, abs_tol=1e-5)


def test_opd_eval_with_a_teacher_of_another_tokenizer(tmp_path, capsys):
    teacher, student = save_cross_pair(tmp_path)
    data = write_data(tmp_path, "plain", "jsonl", n=6)
    cfg = {
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher)},
        "data": {"train": str(data), "eval": str(data)},
        "sampling": {"max_new_tokens": 10},
        "eval_size": 6,
    }
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    assert cli_main(["eval", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "e.json")]) == 0
    out = json.loads((tmp_path / "e.json").read_text())
    div = out["divergence_to_teacher"]
    assert out["teacher"] == str(teacher) and "one-to-one" in div["basis"]
    for side in ("on_student", "on_teacher"):
        a = div["alignment"][side]
        assert a["rows"] == 6 and 0 <= a["one_to_one_frac"] <= a["aligned_frac"] <= 1
    assert div["alignment"]["on_teacher"]["one_to_one_frac"] > 0
    for kind in ("forward_kl", "reverse_kl", "tvd"):
        d = div[kind]
        assert all(math.isfinite(d[k]) for k in d)
        assert math.isclose(d["exposure_gap"], d["div_on_student"] - d["div_on_teacher"])
    seq = div["sequence"]
    # sampled estimates of two KLs: positive here (fixed seeds; the models differ widely)
    assert seq["reverse_kl_on_student"] > 0.1 and seq["forward_kl_on_teacher"] > 0.1
    assert config_from_dict(cfg).teacher.path == str(teacher)
