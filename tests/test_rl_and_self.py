"""RL + on-policy distillation (reward mixing) and the self-distillation teacher."""

import copy
import math

import pytest
import torch

from opd.config.parse import LossConfig, config_from_dict
from opd.data.batch import SequenceBatch, assemble
from opd.data.privileged import render_privileged
from opd.data.rows import Encoder
from opd.evaluation.rewards import resolve_reward
from opd.modeling.hf import completion_logits, load_causal_lm, load_tokenizer, token_logprobs
from opd.objectives.plain import batch_loss
from opd.objectives.rl import group_advantages, mixed_batch_loss, reward_pg_loss, sequence_rewards
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.setup import build_run
from opd.sampling.reference import sample
from opd.teachers.local import LocalTeacher
from opd.teachers.self_teacher import SelfTeacher

TEMPLATE = "{answer}|{prompt}"  # the answer first: a privileged prompt much longer than x
ROWS = [
    {"prompt": "12+7=", "answer": "19"},
    {"prompt": "3+4=", "answer": "7"},
    {"prompt": "45+55=", "answer": "100"},
]


def setup_student(student_dir):
    tok = load_tokenizer(str(student_dir))
    data = config_from_dict({"student": {"path": "x"}, "data": {"train": "x"}}).data
    return load_causal_lm(str(student_dir)), Encoder(tok, data), tok


def sampled_batch(model, enc, tok, rows=ROWS, seed=0):
    prompts = [enc.prompt_ids(r["prompt"]) for r in rows]
    out = sample(
        model,
        prompts,
        max_new_tokens=7,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        vocab_size=len(tok),
        generator=torch.Generator().manual_seed(seed),
    )
    return assemble(
        prompts,
        out.completions,
        pad_id=tok.pad_token_id,
        source="student",
        completion_logprobs=out.logprobs,
        rows=list(rows),
    )


def widened(batch: SequenceBatch, extra: int) -> SequenceBatch:
    """The same batch with `extra` trailing padding columns (a wider student grid)."""
    B = batch.size
    pad = lambda t, v: torch.cat([t, torch.full((B, extra), v, dtype=t.dtype)], dim=1)  # noqa: E731
    return SequenceBatch(
        pad(batch.input_ids, 0),
        pad(batch.attention_mask, 0),
        pad(batch.completion_mask, 0),
        batch.prompt_width,
        batch.source,
        pad(batch.sampler_logprobs, 0.0),
        batch.rows,
    )


# ---------------------------------------------------------------- self teacher: alignment


def test_self_teacher_scores_the_same_tokens_at_the_same_columns(tiny_pair):
    _, student_dir = tiny_pair
    model, enc, tok = setup_student(student_dir)
    teacher = SelfTeacher(model, enc, vocab_size=len(tok), template=TEMPLATE, weights="live")
    batch = widened(sampled_batch(model, enc, tok), 2)
    tbatch = teacher.teacher_batch(batch)
    assert tbatch.prompt_width > batch.prompt_width  # the privileged prompts are longer
    scores = teacher.score(batch, "logits")
    assert scores.logits.shape[:2] == batch.loss_mask().shape
    token_lp = teacher.score(batch, "token").token_logprobs
    P, Pt = batch.prompt_width, tbatch.prompt_width
    for i, row in enumerate(ROWS):
        n = int(batch.loss_mask()[i].sum())
        assert n > 0
        comp = batch.input_ids[i, P : P + n].tolist()
        assert tbatch.input_ids[i, Pt : Pt + n].tolist() == comp  # same tokens, same columns
        tprompt = enc.prompt_ids(render_privileged(TEMPLATE, row))
        assert tbatch.input_ids[i, Pt - len(tprompt) : Pt].tolist() == tprompt
        # Reference: one unpadded sequence [privileged prompt + completion] through the model.
        full = torch.tensor([tprompt + comp])
        with torch.no_grad():
            ref = model(input_ids=full).logits[0, len(tprompt) - 1 : len(tprompt) - 1 + n]
        torch.testing.assert_close(scores.logits[i, :n], ref, atol=2e-5, rtol=1e-4)
        for j in range(n):  # column j is about completion token j, for student and teacher
            expect = torch.log_softmax(ref[j], -1)[comp[j]]
            torch.testing.assert_close(token_lp[i, j], expect, atol=2e-5, rtol=1e-4)


def test_self_teacher_without_privileged_context_is_the_student(tiny_pair):
    """Template '{prompt}' and starting weights: the teacher's scores are the student's own,
    so every divergence is zero (any misalignment of columns would show here)."""
    _, student_dir = tiny_pair
    model, enc, tok = setup_student(student_dir)
    teacher = SelfTeacher(model, enc, vocab_size=len(tok), template="{prompt}", weights="frozen")
    batch = sampled_batch(model, enc, tok)
    with torch.no_grad():
        own = completion_logits(model, batch, len(tok))
    got = teacher.score(batch, "logits").logits
    mask = batch.loss_mask()
    torch.testing.assert_close(got[mask], own[mask], atol=1e-5, rtol=1e-5)
    loss, div = batch_loss(own, batch, teacher.score(batch, "logits"), LossConfig(), 10)
    assert abs(float(loss)) < 1e-6 and abs(div) < 1e-5


def test_privileged_template_names_a_missing_column(tiny_pair):
    with pytest.raises(ValueError, match="needs column 'solution'"):
        render_privileged("{prompt}{solution}", ROWS[0])
    with pytest.raises(ValueError, match=r"teacher\.privileged_template"):
        config_from_dict(
            {"student": {"path": "x"}, "teacher": {"kind": "self", "privileged_template": "{}"}}
        )


# ---------------------------------------------------------------- teacher weights


def test_ema_update_matches_hand_computation(tiny_pair):
    _, student_dir = tiny_pair
    model, enc, tok = setup_student(student_dir)
    d = 0.75
    teacher = SelfTeacher(
        model, enc, vocab_size=len(tok), template=TEMPLATE, weights="ema", ema_decay=d
    )
    names = [n for n, _ in model.named_parameters()]
    bar = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        teacher.after_optimizer_step()
        for n, p in model.named_parameters():
            bar[n] = d * bar[n] + (1 - d) * p.detach().double()
    held = dict(teacher.model.named_parameters())
    for n in names:
        torch.testing.assert_close(held[n].double(), bar[n], atol=1e-6, rtol=1e-6)
        assert not torch.equal(held[n], dict(model.named_parameters())[n])
    assert teacher.updates == 3
    state = teacher.checkpoint_state()
    fresh = SelfTeacher(
        copy.deepcopy(model), enc, vocab_size=len(tok), template=TEMPLATE, weights="ema"
    )
    fresh.load_checkpoint_state(state)
    for n, p in fresh.model.named_parameters():
        assert torch.equal(p, held[n])


def test_ema_with_lora_swaps_adapters_in_and_back(tiny_pair):
    from peft import LoraConfig, get_peft_model

    _, student_dir = tiny_pair
    base, enc, tok = setup_student(student_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    teacher = SelfTeacher(
        model, enc, vocab_size=len(tok), template=TEMPLATE, weights="ema", ema_decay=0.5
    )
    adapters = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in adapters]
    with torch.no_grad():
        for p in adapters:
            p.add_(0.3)
    teacher.after_optimizer_step()
    batch = sampled_batch(model, enc, tok)
    got = teacher.score(batch, "logits").logits
    live = [p.detach().clone() for p in adapters]
    with torch.no_grad():  # the model with adapters at the hand-computed average
        for p, s in zip(adapters, start, strict=True):
            p.copy_(0.5 * s + 0.5 * (s + 0.3))
        ref = completion_logits(model.eval(), teacher.teacher_batch(batch), len(tok))
        for p, v in zip(adapters, live, strict=True):
            p.copy_(v)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for p, v in zip(adapters, live, strict=True):  # live adapters restored after scoring
        assert torch.equal(p, v)


def self_config(base_config, tmp_path, name, **kw):
    return config_from_dict(
        base_config(
            teacher__kind="self",
            teacher__privileged_template=TEMPLATE,
            source__lmbda=1.0,
            loss__divergence="jsd",
            output_dir=str(tmp_path / name),
            **kw,
        )
    )


def test_frozen_teacher_is_unchanged_by_training(base_config, tiny_pair, tmp_path):
    _, student_dir = tiny_pair
    start = {n: p.clone() for n, p in load_causal_lm(str(student_dir)).named_parameters()}
    cfg = self_config(base_config, tmp_path, "frozen", teacher__self_weights="frozen", steps=3)
    run = build_run(cfg)
    train(cfg, run)
    held = dict(run.teacher.model.named_parameters())
    moved = dict(run.student.named_parameters())
    assert any(not torch.equal(moved[n], start[n]) for n in start)  # the student did learn
    for n, p in start.items():
        assert torch.equal(held[n], p), n


def test_frozen_teacher_with_lora_is_the_base_model(base_config, tiny_pair, tmp_path):
    _, student_dir = tiny_pair
    cfg = self_config(
        base_config,
        tmp_path,
        "frozen_lora",
        teacher__self_weights="frozen",
        lora__enabled=True,
        lora__r=4,
        steps=3,
        optim__lr=1e-2,
    )
    run = build_run(cfg)
    assert run.teacher.model is run.student  # no second copy of the weights
    train(cfg, run)
    model, enc, tok = setup_student(student_dir)
    batch = sampled_batch(run.student, enc, tok)
    got = run.teacher.score(batch, "logits").logits
    base = LocalTeacher(model, len(tok)).score(run.teacher.teacher_batch(batch), "logits")
    torch.testing.assert_close(got, base.logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # while the student (adapters on) has moved away from the base
        adapted = completion_logits(run.student.eval(), run.teacher.teacher_batch(batch), len(tok))
    assert (adapted - base.logits).abs().max() > 1e-3


# ---------------------------------------------------------------- rewards


def test_reward_functions_including_import_path(tmp_path, monkeypatch):
    row = {"answer": "19"}
    exact = resolve_reward("exact_match")
    assert exact("12+7 # 19", row) == 1.0 and exact("# 18", row) == 0.0
    regex = resolve_reward("regex", r"answer: (\d+)")
    assert regex("answer: 3 ... answer: 19", row) == 1.0 and regex("19", row) == 0.0
    (tmp_path / "my_rewards.py").write_text(
        "def shortness(text, row):\n    return -float(len(text))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    custom = resolve_reward("my_rewards:shortness")
    assert custom("abc", row) == -3.0
    with pytest.raises(ValueError, match=r"reward\.function=.my_rewards:nope. cannot be imported"):
        resolve_reward("my_rewards:nope")
    with pytest.raises(ValueError, match=r"reward\.function=.bleu."):
        resolve_reward("bleu")
    with pytest.raises(ValueError, match=r"needs reward\.pattern"):
        resolve_reward("regex")


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])  # the second group all equal
    adv = group_advantages(r, 3, "group")
    s = math.sqrt(1 / 3)  # sample std of (1, 0, 0)
    expect = [(1 - 1 / 3) / (s + 1e-4), -1 / 3 / (s + 1e-4), -1 / 3 / (s + 1e-4), 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expect))
    assert torch.equal(group_advantages(r, 3, "none"), r)
    with pytest.raises(ValueError, match="groups of >= 2"):
        group_advantages(r, 4, "group")


def test_sequence_rewards_decode_each_completion(tiny_pair):
    _, student_dir = tiny_pair
    _, enc, tok = setup_student(student_dir)
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "5"}]
    batch = assemble(
        [enc.prompt_ids(r["prompt"]) for r in rows],
        [enc.completion_ids("#2"), enc.completion_ids("#4")],
        pad_id=tok.pad_token_id,
        rows=rows,
    )
    assert sequence_rewards(batch, tok, resolve_reward("exact_match")).tolist() == [1.0, 0.0]


# ---------------------------------------------------------------- alpha = 0 and alpha = 1


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("objective", ["kd", "pg"])
def test_alpha_endpoints_reduce_to_the_pure_objectives(tiny_pair, objective):
    teacher_dir, student_dir = tiny_pair
    model, enc, tok = setup_student(student_dir)
    teacher = LocalTeacher(load_causal_lm(str(teacher_dir)), len(tok))
    rows = [r for r in ROWS for _ in range(2)]  # 3 prompts x 2 samples
    batch = sampled_batch(model, enc, tok, rows=rows)
    loss_cfg = LossConfig(objective=objective, divergence="reverse_kl")
    scores = teacher.score(batch, "token" if objective == "pg" else "logits")
    N = batch.num_target_tokens() + 5  # a step with more tokens than this micro-batch
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 2, "group")

    def run(fn):
        model.zero_grad()
        loss = fn(completion_logits(model, batch, len(tok)))
        loss.backward()
        return loss.detach(), _grads(model)

    def mixed(a):
        return lambda logits: mixed_batch_loss(logits, batch, scores, loss_cfg, N, adv, a).loss

    def pure_rl(logits):
        lp = token_logprobs(logits, batch.completion_ids())
        q = batch.sampler_logprobs[:, batch.prompt_width :]
        return (reward_pg_loss(lp, adv, q) * batch.loss_mask()).sum() / N

    distill_loss, distill_grads = run(lambda lg: batch_loss(lg, batch, scores, loss_cfg, N)[0])
    rl_loss, rl_grads = run(pure_rl)
    for a, loss_ref, grads_ref in ((1.0, distill_loss, distill_grads), (0.0, rl_loss, rl_grads)):
        loss, grads = run(mixed(a))
        torch.testing.assert_close(loss, loss_ref, atol=0, rtol=0)
        for g, r in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, r, atol=1e-7, rtol=1e-6)
    half, half_grads = run(mixed(0.25))
    torch.testing.assert_close(half, 0.75 * rl_loss + 0.25 * distill_loss)
    for g, r, d in zip(half_grads, rl_grads, distill_grads, strict=True):
        torch.testing.assert_close(g, 0.75 * r + 0.25 * d, atol=1e-6, rtol=1e-5)
    # The sampler is the current student at temperature 1: every ratio is 1 in value, so
    # the RL loss is -sum_i A_i * L_i / N.
    lengths = batch.loss_mask().sum(-1).float()
    torch.testing.assert_close(rl_loss, -(adv * lengths).sum() / N, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- end to end


def test_self_distillation_runs_end_to_end(base_config, tmp_path):
    """Frozen, EMA and live teachers start as the student's own weights, so step 1 is the
    same step under all three (same samples, same divergence); by step 2 the live teacher
    has moved with the student and the frozen one has not."""
    runs = {}
    for weights in ("frozen", "ema", "live"):
        cfg = self_config(base_config, tmp_path, weights, teacher__self_weights=weights, steps=2)
        train(cfg)
        runs[weights] = records = read_metrics(cfg.output_dir)
        assert len(records) == 2 and not any(r["skipped"] for r in records)
        assert all(r["teacher_tokens_scored"] == r["student_tokens_generated"] > 0 for r in records)
        assert all(r["divergence"] > 0 for r in records)
    first = [(r[0]["tokens"], r[0]["divergence"], r[0]["loss"]) for r in runs.values()]
    assert first[0] == pytest.approx(first[1], rel=1e-6) and first[0] == pytest.approx(first[2], rel=1e-6)
    assert runs["live"][1]["divergence"] != pytest.approx(runs["frozen"][1]["divergence"], rel=1e-6)


def _self_run(base_config, tmp_path, name, template, loss):
    cfg = config_from_dict(
        base_config(
            teacher={"kind": "self", "privileged_template": template, "self_weights": "live"},
            source__lmbda=1.0,
            loss=loss,
            steps=1,
            output_dir=str(tmp_path / name),
        )
    )
    train(cfg)
    (record,) = read_metrics(cfg.output_dir)
    assert record["teacher_tokens_scored"] == record["student_tokens_generated"] > 0
    return record


def test_self_teacher_topk_at_full_vocabulary_equals_full(base_config, tmp_path, tiny_pair):
    """The same seeded step with top-V and full estimators: the same loss and divergence."""
    V = len(load_tokenizer(str(tiny_pair[1])))
    kd = {"objective": "kd", "divergence": "forward_kl", "kd_temperature": 2.0, "fused": False}
    full = _self_run(base_config, tmp_path, "full", TEMPLATE, kd)
    topk = _self_run(
        base_config, tmp_path, "topk", TEMPLATE, {**kd, "estimator": "topk", "topk": V}
    )
    assert topk["loss"] == pytest.approx(full["loss"], rel=1e-4)
    assert topk["divergence"] == pytest.approx(full["divergence"], rel=1e-4)
    assert full["divergence"] > 1e-5  # the privileged prompt changes the teacher


def test_self_teacher_pg_sees_the_privileged_context(base_config, tmp_path):
    """pg's sampled-token estimate is exactly 0 when the teacher's prompt is the student's
    (live weights, template '{prompt}') and not when the answer is in it."""
    same = _self_run(base_config, tmp_path, "same", "{prompt}", {"objective": "pg"})
    privileged = _self_run(base_config, tmp_path, "priv", TEMPLATE, {"objective": "pg"})
    assert abs(same["divergence"]) < 1e-6 and abs(same["loss"]) < 1e-6
    assert abs(privileged["divergence"]) > 1e-3


def test_ema_self_teacher_resumes_exactly(base_config, tmp_path):
    from opd.run.checkpoint import latest_checkpoint, load_trainer_state

    kw = {"teacher__self_weights": "ema", "teacher__ema_decay": 0.5}
    train(self_config(base_config, tmp_path, "a", steps=4, **kw))
    part = self_config(base_config, tmp_path, "b", steps=2, **kw)
    train(part)
    resumed = config_from_dict(
        base_config(
            teacher__kind="self",
            teacher__privileged_template=TEMPLATE,
            source__lmbda=1.0,
            loss__divergence="jsd",
            output_dir=str(tmp_path / "b"),
            steps=4,
            resume=True,
            **kw,
        )
    )
    train(resumed)
    a = load_trainer_state(latest_checkpoint(tmp_path / "a"))["teacher_state"]
    b = load_trainer_state(latest_checkpoint(tmp_path / "b"))["teacher_state"]
    assert a["ema_updates"] == b["ema_updates"] == 4
    for x, y in zip(a["ema_shadows"], b["ema_shadows"], strict=True):
        assert torch.equal(x, y)
    losses = [[r["loss"] for r in read_metrics(tmp_path / n)] for n in ("a", "b")]
    assert losses[0] == losses[1]


def test_rl_plus_kd_reports_both_terms(base_config, tmp_path):
    cfg = config_from_dict(
        base_config(
            preset="minillm_like",
            reward={"function": "exact_match", "distill_weight": 0.4},
            sampling__n=2,
            sampling__max_new_tokens=4,
            steps=3,
        )
    )
    train(cfg)
    records = read_metrics(cfg.output_dir)
    for r in records:
        assert r["reward_samples"] == 8 and 0.0 <= r["reward_mean"] <= 1.0
        assert r["distill_weight"] == 0.4 and r["distill_term"] > 0
        # the distillation term is alpha x the step's mean divergence, measured on its own
        assert r["distill_term"] == pytest.approx(0.4 * r["divergence"], rel=1e-6)
        # (the reward term's exact value: test_alpha_endpoints_reduce_to_the_pure_objectives)
        assert r["teacher_tokens_scored"] > 0


def test_pure_rl_loads_and_calls_no_teacher(base_config, tmp_path):
    cfg = config_from_dict(
        base_config(
            source__lmbda=1.0,
            teacher__path="/does/not/exist",
            reward={"function": "exact_match", "distill_weight": 0.0},
            sampling__n=2,
            steps=2,
        )
    )
    train(cfg)
    for r in read_metrics(cfg.output_dir):
        assert r["teacher_tokens_scored"] == 0 and r["distill_term"] == 0.0
        assert r["loss"] == pytest.approx(r["reward_term"])


@pytest.mark.parametrize(
    "override,message",
    [
        ({"reward": {"function": "exact_match"}}, "needs student samples"),
        (
            {"reward": {"function": "exact_match"}, "source": {"lmbda": 1.0}},
            "needs sampling.n >= 2",
        ),
        ({"reward": {"distill_weight": 1.5}}, "reward.distill_weight=1.5 must be <= 1"),
        ({"reward": {"alpha": 0.5}}, "unknown config key reward.alpha"),
        ({"reward": {"function": "regex"}}, "needs reward.pattern"),
        ({"teacher": {"kind": "self", "self_weights": "old"}}, "teacher.self_weights='old'"),
        ({"teacher": {"ema_decay": 1.5}}, "teacher.ema_decay=1.5 must be <= 1"),
    ],
)
def test_bad_reward_and_self_configs_name_the_key(override, message, base_config):
    data = base_config()
    for key, value in override.items():
        data[key] = {**data.get(key, {}), **value}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(data)
