"""Top-k KD at k = V equals full-vocabulary KD at every kd_temperature, for every teacher.

A top-k teacher that returned temperature-1 log-probs while the student is tempered gives
2-4x the full loss at T=2; these tests compare the two estimators on the same batch.
"""

import pytest
import torch

from opd.config.parse import LossConfig, config_from_dict
from opd.data.batch import assemble
from opd.data.rows import Encoder
from opd.modeling.hf import completion_logits, load_causal_lm, load_tokenizer
from opd.objectives.plain import per_token_loss
from opd.teachers.base import check_untempered
from opd.teachers.local import LocalTeacher
from opd.teachers.self_teacher import SelfTeacher

ROWS = [{"prompt": "12+7=", "answer": "19"}, {"prompt": "3+4=", "answer": "7"}]


def _batch(tok, enc):
    prompts = [enc.prompt_ids(r["prompt"]) for r in ROWS]
    completions = [enc.completion_ids("19"), enc.completion_ids("7+0")]
    return assemble(prompts, completions, pad_id=tok.pad_token_id, rows=ROWS)


def _teachers(tiny_pair):
    teacher_dir, student_dir = tiny_pair
    tok = load_tokenizer(str(student_dir))
    data = config_from_dict({"student": {"path": "x"}, "data": {"train": "x"}}).data
    enc = Encoder(tok, data)
    student = load_causal_lm(str(student_dir))
    local = LocalTeacher(load_causal_lm(str(teacher_dir)), len(tok))
    self_teacher = SelfTeacher(
        student, enc, vocab_size=len(tok), template="{answer}|{prompt}", weights="frozen"
    )
    return tok, enc, student, {"local": local, "self": self_teacher}


@pytest.mark.parametrize("kind", ["local", "self"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_at_full_vocabulary_equals_full(tiny_pair, kind, temperature, divergence):
    tok, enc, student, teachers = _teachers(tiny_pair)
    teacher, batch = teachers[kind], _batch(tok, enc)
    V = len(tok)
    logits = completion_logits(student, batch, V)
    common = dict(objective="kd", divergence=divergence, kd_temperature=temperature)
    full = LossConfig(**common, estimator="full")
    topk = LossConfig(**common, estimator="topk", topk=V)
    mask = batch.loss_mask()
    value_full, _ = per_token_loss(logits, batch, teacher.score(batch, "logits"), full)
    scores = teacher.score(batch, "topk", V, temperature)
    value_topk, _ = per_token_loss(logits, batch, scores, topk)
    torch.testing.assert_close(value_topk[mask], value_full[mask], rtol=1e-4, atol=1e-6)
    assert float(value_full[mask].sum()) > 1e-5  # the models differ: not 0 == 0


def test_untempered_topk_differs_from_full(tiny_pair):
    """The check above can fail: T=1 teacher top-k against a T=2 student is another loss."""
    tok, enc, student, teachers = _teachers(tiny_pair)
    batch, V = _batch(tok, enc), len(tok)
    logits = completion_logits(student, batch, V)
    cfg = dict(objective="kd", divergence="forward_kl", kd_temperature=2.0)
    full, _ = per_token_loss(
        logits, batch, teachers["local"].score(batch, "logits"), LossConfig(**cfg)
    )
    wrong = teachers["local"].score(batch, "topk", V, 1.0)
    mixed, _ = per_token_loss(logits, batch, wrong, LossConfig(**cfg, estimator="topk", topk=V))
    mask = batch.loss_mask()
    assert not torch.allclose(mixed[mask], full[mask], rtol=1e-2)


@pytest.mark.parametrize("kind", ["remote", "cached"])
def test_sparse_teachers_refuse_tempered_topk(kind, tiny_pair):
    _, student = tiny_pair
    data = {
        "student": {"path": str(student)},
        "teacher": {"kind": kind, "url": "http://127.0.0.1:1", "cache_dir": "c"},
        "data": {"train": "x"},
        "loss": {"estimator": "topk", "topk": 8, "kd_temperature": 2.0},
    }
    with pytest.raises(ValueError, match=r"kd_temperature=2\.0"):
        config_from_dict(data)
    with pytest.raises(ValueError, match="temperature 1 only"):
        check_untempered(kind, 2.0)
