"""End to end: a byte-level BPE student distilled from a SentencePiece-style teacher."""

from __future__ import annotations

import math

import pytest

from opd.config.parse import config_from_dict
from opd.modeling.hf import load_tokenizer
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.setup import build_run
from opd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher
from opd.teachers.local import LocalTeacher
from real_format import write_data
from sp_format import save_cross_pair

LOSSES = {
    "pg": {"objective": "pg"},
    "topk": {"objective": "kd", "estimator": "topk", "topk": 8, "divergence": "reverse_kl"},
    "full": {"objective": "kd", "estimator": "full", "divergence": "forward_kl"},
}


@pytest.fixture(scope="module")
def cross_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    teacher, student = save_cross_pair(root)
    return teacher, student, write_data(root, "plain", "jsonl")


def config(cross_setup, tmp_path, **loss):
    teacher, student, data = cross_setup
    return config_from_dict(
        {
            "student": {"path": str(student)},
            "teacher": {"path": str(teacher)},
            "data": {"train": str(data)},
            "loss": loss,
            "source": {"lmbda": 1.0},
            "steps": 3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "sampling": {"max_new_tokens": 12},
            "optim": {"lr": 1e-3},
            "output_dir": str(tmp_path / "run"),
        }
    )


@pytest.mark.parametrize("name", list(LOSSES))
def test_three_steps_with_a_teacher_of_another_tokenizer(cross_setup, tmp_path, name):
    cfg = config(cross_setup, tmp_path, **LOSSES[name])
    train(cfg)
    records = read_metrics(cfg.output_dir)
    assert len(records) == 3 and not any(r["skipped"] for r in records)
    for r in records:
        assert math.isfinite(r["loss"]) and r["divergence"] != 0
        assert 0 < r["xtok_aligned_frac"] <= 1 and r["xtok_mean_span_len"] >= 1
        assert 0 <= r["xtok_one_to_one_frac"] <= r["xtok_aligned_frac"]
        assert r["teacher_tokens_scored"] > 0


def test_the_students_own_tokenizer_takes_the_shared_path(cross_setup, tmp_path):
    teacher, student, _data = cross_setup
    cfg = config(cross_setup, tmp_path, objective="pg")
    cfg.teacher.path = str(student)  # same tokenizer and chat template: no alignment
    run = build_run(cfg)
    assert type(run.teacher) is LocalTeacher
    cfg.cross_tokenizer.when = "always"
    forced = build_run(cfg)
    assert isinstance(forced.teacher, CrossTokenizerTeacher)
    cfg.teacher.path = str(teacher)
    cfg.cross_tokenizer.when = "auto"
    other = build_run(cfg)
    assert isinstance(other.teacher, CrossTokenizerTeacher)
    assert other.teacher.teacher_tok.get_vocab() == load_tokenizer(str(teacher)).get_vocab()


def test_teacher_samples_in_another_tokenizer_are_refused(cross_setup, tmp_path):
    cfg = config(cross_setup, tmp_path, objective="kd", estimator="topk", topk=8)
    cfg.source.lmbda, cfg.source.off_policy = 0.5, "teacher"
    with pytest.raises(ValueError, match="off_policy=teacher would sample completions"):
        build_run(cfg)


def test_span_kd_key_reaches_the_loss(cross_setup, tmp_path):
    """cross_tokenizer.span_kd=span changes the first step's loss (the same samples: the
    same seed) by the span terms; masked is the default."""
    losses = {}
    for rule in ("masked", "span"):
        cfg = config(cross_setup, tmp_path / rule, **LOSSES["topk"])
        cfg.steps = 1
        cfg.cross_tokenizer.span_kd = rule
        train(cfg)
        (rec,) = read_metrics(cfg.output_dir)
        assert math.isfinite(rec["loss"]) and rec["xtok_one_to_one_frac"] < 1
        losses[rule] = rec["loss"]
    assert losses["span"] != losses["masked"]
