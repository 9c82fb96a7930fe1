"""The fused objectives equal the plain full-logits path: values and student gradients."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.cli.demo.tiny import build_char_tokenizer, tiny_causal_lm
from opd.config.parse import LossConfig, config_from_dict
from opd.data.batch import assemble
from opd.data.rows import Encoder
from opd.modeling.hf import completion_logits, load_causal_lm, load_tokenizer, token_logprobs
from opd.objectives import build_objective, for_step
from opd.objectives.fused import (
    FusedObjective,
    fused_applies,
    fused_batch_loss,
    teacher_hidden,
)
from opd.objectives.fused_tokens import FusedTokenObjective
from opd.objectives.plain import PlainObjective, batch_loss
from opd.objectives.rl import RewardObjective
from opd.run.checkpoint import latest_checkpoint
from opd.run.loop import train
from opd.run.path import objective_path
from opd.run.setup import build_run
from opd.teachers.base import scores_from_logits
from opd.teachers.local import LocalTeacher
from opd.teachers.self_teacher import SelfTeacher

TOK = build_char_tokenizer("0123456789+=|")
V = len(TOK)


@pytest.mark.parametrize(
    "kind,beta", [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.3), ("tvd", None)]
)
def test_fused_batch_loss_equals_plain(kind, beta, tiny_pair):
    teacher_dir, student_dir = tiny_pair
    tok = load_tokenizer(str(student_dir))
    student = load_causal_lm(str(student_dir))
    teacher = LocalTeacher(load_causal_lm(str(teacher_dir)), len(tok))
    batch = assemble(
        [tok("12+3=").input_ids, tok("7=").input_ids],
        [[*tok("15").input_ids, 1], [9, 9, 1]],
        pad_id=tok.pad_token_id,
    )
    loss_cfg = LossConfig(objective="kd", divergence=kind, beta=beta or 0.5, kd_temperature=1.5)
    assert fused_applies(loss_cfg, student, teacher)
    n = batch.num_target_tokens() + 3  # a step count larger than this micro-batch's
    plain, div_plain = batch_loss(
        completion_logits(student, batch, len(tok)),
        batch,
        teacher.score(batch, "logits"),
        loss_cfg,
        n,
    )
    g_plain = torch.autograd.grad(plain, list(student.parameters()))
    fused, div_fused = fused_batch_loss(
        student, teacher, teacher_hidden(teacher, batch), batch, loss_cfg, n, len(tok)
    )
    g_fused = torch.autograd.grad(fused, list(student.parameters()), allow_unused=True)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    assert div_fused == pytest.approx(div_plain, rel=1e-5)
    for a, b in zip(g_fused, g_plain, strict=True):
        torch.testing.assert_close(
            a if a is not None else torch.zeros_like(b), b, rtol=1e-4, atol=1e-6
        )


# ------------------------------------------------ every objective, on a padded vocabulary


def _models():
    """Student and teacher whose heads have 5 rows past the tokenizer (as Qwen pads its
    embedding matrix); the teacher peaked, so the divergences are far from uniform."""
    student = tiny_causal_lm(V + 5, hidden=32, layers=2, seed=1)
    teacher = tiny_causal_lm(V + 5, hidden=48, layers=2, seed=2).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
        student.lm_head.weight[V:].add_(3.0)  # padded rows that would win if not cut off
    return student, teacher


def _batch(with_sampler_logprobs: bool):
    prompts = [TOK(t).input_ids for t in ("12+3=", "7=", "99+1=")]
    completions = [[5, 6, 1], [7, 8, 9, 10, 1], [11]]
    logq = None
    if with_sampler_logprobs:  # a sampler other than the current student: ratios != 1
        g = torch.Generator().manual_seed(3)
        logq = [(-torch.rand(len(c), generator=g) * 3).tolist() for c in completions]
    rows = [{"prompt": p, "answer": a} for p, a in (("12+3=", "15"), ("7=", "7"), ("99+1=", "100"))]
    return assemble(
        prompts, completions, pad_id=0, source="student", completion_logprobs=logq, rows=rows
    )


CASES = [  # (LossConfig overrides, sampler log-probs in the batch)
    ({"objective": "ce"}, False),
    ({"objective": "pg"}, False),
    ({"objective": "pg", "discount": 0.9}, True),
    ({"objective": "kd", "estimator": "topk", "topk": 4, "divergence": "forward_kl"}, False),
    (
        {
            "objective": "kd",
            "estimator": "topk",
            "topk": 3,
            "divergence": "jsd",
            "beta": 0.3,
            "kd_temperature": 1.7,
        },
        False,
    ),
    ({"objective": "kd", "divergence": "skew_reverse_kl", "kd_temperature": 0.8}, False),
]


def _loss_and_grads(objective, student, batch, n):
    scored = objective.score(batch)
    loss, div = objective.loss(batch, scored, n)
    return loss, div, torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)


def fused_objective(student, teacher, loss_cfg, vocab_size):
    """The objective one process would run for this loss (opd.run.path decides)."""
    kind, _ = objective_path(loss_cfg, distributed=False, student=student, teacher=teacher)
    assert kind != "plain"
    return build_objective(kind, student, teacher, loss_cfg, vocab_size)


@pytest.mark.parametrize("overrides,sampled", CASES)
def test_every_objective_fused_equals_plain(overrides, sampled):
    student, teacher_model = _models()
    teacher = LocalTeacher(teacher_model, V)
    loss_cfg = LossConfig(**overrides)
    batch = _batch(sampled)
    assert fused_applies(loss_cfg, student, teacher)
    fused = fused_objective(student, teacher, loss_cfg, V)
    full = overrides["objective"] == "kd" and loss_cfg.estimator == "full"
    assert isinstance(fused, FusedObjective if full else FusedTokenObjective)
    n = batch.num_target_tokens() + 2
    want, div_want, g_want = _loss_and_grads(
        PlainObjective(student, teacher, loss_cfg, V), student, batch, n
    )
    got, div_got, g_got = _loss_and_grads(fused, student, batch, n)
    assert float(want.detach()) != 0.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert div_got == pytest.approx(div_want, rel=1e-5, abs=1e-6)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(
            a if a is not None else torch.zeros_like(b), b, rtol=1e-4, atol=1e-6
        )


def _self_teacher(student, weights="frozen"):
    data = config_from_dict({"student": {"path": "x"}, "data": {"train": "x"}}).data
    return SelfTeacher(
        student, Encoder(TOK, data), vocab_size=V, template="{answer}|{prompt}", weights=weights
    )


@pytest.mark.parametrize("overrides", [{"divergence": "jsd", "beta": 0.5}, {"objective": "pg"}])
def test_self_teacher_fused_equals_plain(overrides):
    """OPSD (full-vocabulary JSD against the privileged-context teacher) and its sampled
    variant, with teacher weights that differ from the student's."""
    student, _ = _models()
    teacher = _self_teacher(student)
    with torch.no_grad():
        for p in student.parameters():  # the student has moved since the frozen copy
            p.add_(torch.randn_like(p) * 0.05)
    loss_cfg = LossConfig(**overrides)
    assert fused_applies(loss_cfg, student, teacher)
    batch = _batch(False)
    n = batch.num_target_tokens()
    want, _, g_want = _loss_and_grads(
        PlainObjective(student, teacher, loss_cfg, V), student, batch, n
    )
    got, _, g_got = _loss_and_grads(
        fused_objective(student, teacher, loss_cfg, V), student, batch, n
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(
            a if a is not None else torch.zeros_like(b), b, rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("need,topk", [("token", 0), ("topk", 4), ("topk", V + 5)])
def test_teacher_token_and_topk_scores_from_hidden_equal_from_logits(need, topk):
    student, teacher_model = _models()
    batch = _batch(False)
    for teacher in (LocalTeacher(teacher_model, V), _self_teacher(student)):
        got = teacher.score(batch, need, topk)
        if isinstance(teacher, LocalTeacher):
            logits = completion_logits(teacher_model, batch, V)
        else:
            logits = teacher.score(batch, "logits").logits
        want = scores_from_logits(logits, batch, need, topk)
        torch.testing.assert_close(got.token_logprobs, want.token_logprobs)
        assert got.tokens_scored == want.tokens_scored == batch.num_target_tokens()
        if need == "topk":
            assert got.topk_ids.shape[-1] == min(topk, V)  # never a padded row
            assert torch.equal(got.topk_ids, want.topk_ids)
            torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs)


def test_remote_style_teacher_gets_the_token_objective_and_full_kd_needs_hidden_states():
    student, teacher_model = _models()

    class TokenOnlyTeacher:  # what a cached / remote teacher offers: scores, no model
        def score(self, batch, need, topk=0):
            return LocalTeacher(teacher_model, V).score(batch, need, topk)

    teacher = TokenOnlyTeacher()
    assert fused_applies(LossConfig(objective="pg"), student, teacher)
    assert not fused_applies(LossConfig(objective="kd"), student, teacher)


# ------------------------------------------------ the loop


def test_loop_uses_fused_path_and_matches_plain_run(base_config, tmp_path):
    fused_cfg = config_from_dict(base_config(preset="gkd", steps=3, output_dir=str(tmp_path / "f")))
    assert build_run(fused_cfg).path.fused
    train(fused_cfg)
    plain_cfg = config_from_dict(
        base_config(preset="gkd", steps=3, loss__fused=False, output_dir=str(tmp_path / "p"))
    )
    assert not build_run(plain_cfg).path.fused
    train(plain_cfg)
    a = load_file(str(Path(latest_checkpoint(tmp_path / "f")) / "model.safetensors"))
    b = load_file(str(Path(latest_checkpoint(tmp_path / "p")) / "model.safetensors"))
    for key in a:
        # Adam divides by sqrt(v): float32 rounding in near-zero gradients shows up at ~1e-6.
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5)


def test_on_policy_pg_run_picks_the_token_objective(base_config, tmp_path):
    run = build_run(config_from_dict(base_config(preset="on_policy", output_dir=str(tmp_path))))
    assert run.path.fused
    assert isinstance(for_step(run).distill, FusedTokenObjective)


def test_ratio_cap_binds_and_fused_equals_plain_above_the_cap():
    """`loss.ratio_cap` on the default (fused) pg path: capped ratios above the cap give the
    plain path's loss and gradients, which differ from the uncapped ones."""
    student, teacher_model = _models()
    teacher = LocalTeacher(teacher_model, V)
    batch = _batch(True)
    lp = token_logprobs(completion_logits(student, batch, V), batch.completion_ids())
    ratios = (lp - batch.sampler_logprobs[:, batch.prompt_width :]).exp()[batch.loss_mask()]
    cap = 0.2  # the ratios here are 0.06 .. 0.55
    assert int((ratios > cap).sum()) >= 2 and int((ratios < cap).sum()) >= 2
    n = batch.num_target_tokens()
    capped = LossConfig(objective="pg", ratio_cap=cap)
    want, _, g_want = _loss_and_grads(PlainObjective(student, teacher, capped, V), student, batch, n)
    got, _, g_got = _loss_and_grads(fused_objective(student, teacher, capped, V), student, batch, n)
    free, _, _ = _loss_and_grads(
        PlainObjective(student, teacher, LossConfig(objective="pg"), V), student, batch, n
    )
    assert abs(float(free) - float(want)) > 1e-4  # the cap changes the loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b, rtol=1e-4, atol=1e-6)


RL_CASES = [  # (distillation loss, distill weight α)
    ({"objective": "pg", "ratio_cap": 0.2}, 0.5),
    ({"objective": "pg"}, 0.0),
    ({"objective": "kd", "estimator": "topk", "topk": 4, "divergence": "reverse_kl"}, 0.3),
    ({"objective": "kd", "divergence": "forward_kl", "ratio_cap": 0.2}, 0.7),
    ({"objective": "kd", "divergence": "jsd", "beta": 0.4}, 1.0),
]


@pytest.mark.parametrize("overrides,alpha", RL_CASES)
def test_rl_plus_distillation_fused_equals_plain(overrides, alpha):
    """RL + KD student batches take the fused objective too: the reward PG term (ratio cap
    included) and the distillation term from hidden states equal the plain path's."""
    from types import SimpleNamespace

    student, teacher_model = _models()
    teacher = LocalTeacher(teacher_model, V)
    config = config_from_dict({
        "student": {"path": "x"}, "data": {"train": "x"}, "loss": overrides,
        "source": {"lmbda": 1.0},
        "reward": {"function": "exact_match", "distill_weight": alpha, "normalize": "none"},
    })  # fmt: skip
    rewards = iter([1.0, 0.0, 1.0] * 2)
    run = SimpleNamespace(
        reward_fn=lambda text, row: next(rewards), tokenizer=TOK, config=config
    )
    batch = _batch(True)
    n = batch.num_target_tokens() + 1
    plain = RewardObjective(run, PlainObjective(student, teacher, config.loss, V))
    fused = RewardObjective(run, fused_objective(student, teacher, config.loss, V))
    want, div_want, g_want = _loss_and_grads(plain, student, batch, n)
    got, div_got, g_got = _loss_and_grads(fused, student, batch, n)
    assert float(want.detach()) != 0.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert div_got == pytest.approx(div_want, rel=1e-5, abs=1e-6)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b, rtol=1e-4, atol=1e-6)
    assert fused.record()["reward_term"] == pytest.approx(plain.record()["reward_term"], rel=1e-5)


def test_lm_head_is_the_weight_itself_when_nothing_is_cut():
    """A full-width slice `weight[:V]` is still a view whose backward writes the whole
    `[V, H]` gradient into a fresh zero tensor; nothing to cut, nothing sliced."""
    from opd.modeling.hf import lm_head

    model = tiny_causal_lm(10, hidden=8, layers=1, seed=0)
    weight, _ = lm_head(model, 10)
    assert weight is model.get_output_embeddings().weight
    cut, _ = lm_head(model, 7)
    assert cut.shape[0] == 7 and cut._base is model.get_output_embeddings().weight
