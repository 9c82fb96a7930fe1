"""End to end: a byte-level BPE student distilled from a SentencePiece-style teacher."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from opd.config.parse import config_from_dict
from opd.modeling.hf import load_causal_lm, load_tokenizer, shared_vocab_size
from opd.run.checkpoint import latest_checkpoint
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.setup import build_run
from opd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher
from opd.teachers.local import LocalTeacher
from real_format import write_data
from sp_format import save_cross_pair, tiny_model

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


def test_boundary_key_reaches_the_pg_loss(cross_setup, tmp_path):
    """cross_tokenizer.boundary: `marginal` (default) asks the teacher for its top-k and
    gives per-token rewards (`test_cross_tokenizer_boundary`), reported per step; `token`
    keeps per-span ones; a k below 1 is refused when the config is read."""
    for rule in ("marginal", "token"):
        cfg = config(cross_setup, tmp_path / rule, objective="pg")
        cfg.steps, cfg.cross_tokenizer.boundary = 1, rule
        run = build_run(cfg)
        assert run.teacher.boundary_topk == (16 if rule == "marginal" else 0)
        train(cfg, run)
        (rec,) = read_metrics(cfg.output_dir)
        assert math.isfinite(rec["loss"]) and ("xtok_boundary_moved_frac" in rec) == (rule == "marginal")
        assert rec.get("xtok_boundary_nats_per_end", 0) >= 0
    with pytest.raises(ValueError, match="boundary_topk=0 must be an integer >= 1"):
        config_from_dict({"cross_tokenizer": {"boundary_topk": 0}})



@pytest.fixture(scope="module")
def same_tok_teacher(cross_setup):
    """A teacher with the student's tokenizer and chat template (other weights)."""
    _teacher, student, _data = cross_setup
    s_tok = load_tokenizer(str(student))
    path = student.parent / "bpe-teacher"
    tiny_model(s_tok, seed=1, hidden=48, layers=2, scale=8.0).save_pretrained(path)
    s_tok.save_pretrained(path)
    return path


def two_steps(cross_setup, out, name, teacher_path, *, when="auto", today=False, lmbda=1.0):
    """Final weights of a 2-step run; `today`: the teacher built as the shared path builds
    it (check_same_tokenizer's LocalTeacher), bypassing the registry's identity check."""
    cfg = config(cross_setup, out, **LOSSES[name])
    cfg.teacher.path, cfg.cross_tokenizer.when, cfg.steps = str(teacher_path), when, 2
    cfg.source.lmbda = lmbda
    run = build_run(cfg)
    if today:
        model = load_causal_lm(str(teacher_path), dtype=cfg.teacher.dtype, device=run.device)
        run.teacher = LocalTeacher(model, shared_vocab_size(run.tokenizer, model))
    train(cfg, run)
    assert all(r["divergence"] != 0 for r in read_metrics(cfg.output_dir))
    weights = load_file(str(latest_checkpoint(cfg.output_dir) / "model.safetensors"))
    return type(run.teacher), weights


def assert_bitwise(a, b, student):
    init = load_file(str(student / "model.safetensors"))
    assert any(not torch.equal(init[k], a[k]) for k in init)  # the steps changed weights
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.mark.parametrize("name", list(LOSSES))
def test_two_steps_bitwise_equal_on_the_identity_path(cross_setup, same_tok_teacher, tmp_path, name):
    """The student's tokenizer as teacher, routed by the identity check, against today's
    same-tokenizer path: the same weights bit for bit after two on-policy steps."""
    kind, routed = two_steps(cross_setup, tmp_path / "routed", name, same_tok_teacher)
    assert kind is LocalTeacher
    _, today = two_steps(cross_setup, tmp_path / "today", name, same_tok_teacher, today=True)
    assert_bitwise(routed, today, cross_setup[1])


@pytest.mark.parametrize("name", ["pg", "topk"])
def test_two_steps_bitwise_equal_forced_through_alignment(
    cross_setup, same_tok_teacher, tmp_path, name
):
    """Forced through alignment (when=always) on the dataset's completions (each the
    tokenizer's own encoding of valid text: every span one token) the steps are bit for
    bit the shared path's. (On a random student's samples they are not: a sampled special
    token or a cut character masks the row's rest, a non-canonical spelling is one span.)"""
    _, shared = two_steps(cross_setup, tmp_path / "shared", name, same_tok_teacher, lmbda=0.0)
    kind, forced = two_steps(
        cross_setup, tmp_path / "forced", name, same_tok_teacher, when="always", lmbda=0.0
    )
    assert kind is CrossTokenizerTeacher
    assert_bitwise(shared, forced, cross_setup[1])
