"""Several teachers in one run (`opd.teachers.routing`): each row scored by its teacher."""

from __future__ import annotations

import json
import random

import pytest
import torch

from opd.config.parse import LossConfig, config_from_dict
from opd.data.batch import assemble
from opd.modeling.hf import load_causal_lm
from opd.objectives import build_objective
from opd.objectives.plain import PlainObjective
from opd.run.checkpoint import latest_checkpoint, load_trainer_state
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.preflight import preflight
from opd.run.setup import build_run
from opd.teachers.local import LocalTeacher
from opd.teachers.routing import RoutedTeacher, column_route, mix_route, subset
from serve_util import random_seqs


@pytest.fixture(scope="module")
def two_teachers(tiny_pair):
    """Recognisably different teachers: the (peaked) teacher model and the student model."""
    a, b = (load_causal_lm(str(p)).eval() for p in tiny_pair)
    vocab = min(a.config.vocab_size, b.config.vocab_size)
    return {"big": LocalTeacher(a, vocab), "small": LocalTeacher(b, vocab)}, vocab


def a_batch(vocab: int, rows: list[dict], seed: int = 0):
    rng = random.Random(seed)
    n = len(rows)
    return assemble(
        random_seqs(rng, n, vocab, 1, 9), random_seqs(rng, n, vocab, 1, 12), pad_id=0, rows=rows
    )


@pytest.mark.parametrize("need,k", [("token", 0), ("topk", 5), ("logits", 0)])
def test_column_route_scores_each_row_by_its_teacher(two_teachers, need, k):
    teachers, vocab = two_teachers
    rows = [{"domain": d} for d in ["x", "y", "y", "x", "z", "y"]]
    batch = a_batch(vocab, rows)
    route = column_route("domain", {"x": "big", "y": "small"}, "big", list(teachers))
    got = RoutedTeacher(teachers, route).score(batch, need, k)
    mask = batch.loss_mask()
    for name, want_rows in (("big", [0, 3, 4]), ("small", [1, 2, 5])):
        want = teachers[name].score(batch, need, k)
        for field in ("token_logprobs", "topk_ids", "topk_logprobs", "logits"):
            g, w = getattr(got, field), getattr(want, field)
            assert (g is None) == (w is None), field
            if g is None:
                continue
            for r in want_rows:
                torch.testing.assert_close(g[r][mask[r]], w[r][mask[r]], rtol=1e-5, atol=1e-5)
    assert got.tokens_scored == batch.num_target_tokens()
    # the two teachers really differ, so a row scored by the wrong one would be caught
    big, small = (teachers[n].score(batch, "token").token_logprobs for n in ("big", "small"))
    assert (big - small)[mask].abs().max() > 0.1


def test_unknown_column_value_is_refused_naming_the_known_ones(two_teachers):
    teachers, vocab = two_teachers
    batch = a_batch(vocab, [{"domain": "x"}, {"domain": "q"}])
    route = column_route("domain", {"x": "big", "y": "small"}, "", list(teachers))
    with pytest.raises(ValueError, match=r"'q' names no teacher.*'x' -> big.*'y' -> small"):
        RoutedTeacher(teachers, route).score(batch, "token")


def test_mix_route_is_deterministic_and_follows_weights(two_teachers):
    vocab = two_teachers[1]
    batch = a_batch(vocab, [{}] * 200, seed=3)
    route = mix_route({"big": 3.0, "small": 1.0}, seed=7)
    names = [route(batch, r) for r in range(batch.size)]
    assert names == [mix_route({"big": 3.0, "small": 1.0}, seed=7)(batch, r) for r in range(200)]
    assert 0.65 < names.count("big") / 200 < 0.85
    assert names != [mix_route({"big": 3.0, "small": 1.0}, seed=8)(batch, r) for r in range(200)]


def test_step_record_per_teacher_without_nan(two_teachers):
    teachers, vocab = two_teachers
    batch = a_batch(vocab, [{"domain": "x"}] * 3)
    routed = RoutedTeacher(teachers, column_route("domain", {"x": "big"}, "", list(teachers)))
    routed.score(batch, "token")
    record = routed.step_record()
    assert record["teacher_big_tokens"] == batch.num_target_tokens()
    assert record["teacher_big_share"] == 1.0 and record["teacher_small_share"] == 0.0
    assert record["teacher_small_rows"] == 0 and record["teacher_small_seconds"] == 0.0
    assert record["teacher_small_divergence"] is None  # no rows: null, never NaN
    assert routed.step_record()["teacher_big_tokens"] == 0  # per step: reset
    # a multi-process run sums each teacher's counts over ranks (here: two identical ranks)
    routed.score(batch, "token")
    doubled = routed.step_record(lambda values: [2 * v for v in values])
    assert doubled["teacher_big_tokens"] == 2 * batch.num_target_tokens()
    assert doubled["teacher_big_rows"] == 6 and doubled["teacher_big_share"] == 1.0


def perturbed_student(path: str):
    """A student unlike both teachers (one of them is the student model itself)."""
    student = load_causal_lm(path).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return student


@pytest.mark.parametrize(
    "implementation,loss",
    [
        ("plain", {"objective": "kd", "estimator": "full", "divergence": "forward_kl"}),
        ("plain", {"objective": "pg"}),
        ("fused_tokens", {"objective": "kd", "estimator": "topk", "topk": 5, "divergence": "jsd"}),
        ("fused_tokens", {"objective": "pg"}),
    ],
)
def test_each_teachers_divergence_is_the_loss_over_its_rows(
    two_teachers, tiny_pair, implementation, loss
):
    """Per-teacher divergence comes from the loss's own per-token terms: it equals a
    one-teacher loss over only that teacher's rows (computed independently, by the plain
    objective), and the token-weighted mean over teachers is the micro-batch's divergence."""
    teachers, vocab = two_teachers
    student = perturbed_student(str(tiny_pair[1]))
    rows = [{"domain": d} for d in ["x", "y", "y", "x", "z", "y", "x"]]
    batch = a_batch(vocab, rows, seed=5)
    routed = RoutedTeacher(teachers, column_route("domain", {"y": "small"}, "big", list(teachers)))
    loss_cfg = LossConfig(**loss)
    objective = build_objective(implementation, student, routed, loss_cfg, vocab)
    n = batch.num_target_tokens()
    with torch.no_grad():
        _, div_sum = objective.loss(batch, objective.score(batch), n)
    record = routed.step_record()
    divergences = {}
    for name, want_rows in (("big", [0, 3, 4, 6]), ("small", [1, 2, 5])):
        sub = subset(batch, want_rows)
        alone = PlainObjective(student, teachers[name], loss_cfg, vocab)
        with torch.no_grad():
            _, sub_sum = alone.loss(sub, alone.score(sub), 1)
        assert record[f"teacher_{name}_tokens"] == sub.num_target_tokens()
        divergences[name] = sub_sum / sub.num_target_tokens()
        assert record[f"teacher_{name}_divergence"] == pytest.approx(divergences[name], rel=1e-4)
    weighted = sum(
        record[f"teacher_{t}_tokens"] * record[f"teacher_{t}_divergence"] for t in teachers
    )
    assert weighted / n == pytest.approx(div_sum / n, rel=1e-5)
    # the teachers are told apart: crediting a row to the other teacher would show
    assert abs(divergences["big"] - divergences["small"]) > 0.05 * abs(divergences["big"])


@pytest.fixture
def domain_data(tmp_path):
    """Addition rows tagged with a `domain` column: 'even' or 'odd' by the first number."""
    path = tmp_path / "domains.jsonl"
    rng = random.Random(1)
    lines = []
    for _ in range(24):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        row = {"prompt": f"{a}+{b}=", "completion": f"{a + b}", "answer": str(a + b)}
        lines.append(json.dumps({**row, "domain": "even" if a % 2 == 0 else "odd"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_losses(base_config, data, name: str, tmp_path, **kw) -> list[float]:
    if "teachers" in kw:
        kw.setdefault("teacher", {})  # base_config's teacher: section, replaced by teachers:
    config = config_from_dict(
        base_config(
            preset="supervised_kd",
            data__train=str(data),
            output_dir=str(tmp_path / name),
            **kw,
        )
    )
    train(config)
    return [r["loss"] for r in read_metrics(config.output_dir)]


def test_one_teacher_through_teachers_is_teacher_bit_for_bit(
    base_config, tiny_pair, domain_data, tmp_path
):
    big = {"kind": "local", "path": str(tiny_pair[0])}
    plain = run_losses(base_config, domain_data, "plain", tmp_path, teacher=big)
    named = run_losses(base_config, domain_data, "named", tmp_path, teachers={"big": big})
    assert named == plain


def test_routing_by_column_in_training(base_config, tiny_pair, domain_data, tmp_path):
    big = {"kind": "local", "path": str(tiny_pair[0])}
    small = {"kind": "local", "path": str(tiny_pair[1])}
    teachers = {"big": big, "small": small}
    # loss.fused=false: a routed teacher gives logits, never hidden states, so the run it is
    # compared with must take the same (plain) path
    only_big = run_losses(base_config, domain_data, "big", tmp_path, teacher=big, loss__fused=False)
    only_small = run_losses(base_config, domain_data, "small", tmp_path, teacher=small)
    # every row to big through the router: the same run as big alone
    to_big = run_losses(
        base_config,
        domain_data,
        "to_big",
        tmp_path,
        teachers=teachers,
        routing={"key": "domain", "map": {"none": "small"}, "default": "big"},
    )
    assert to_big == only_big
    split = run_losses(
        base_config,
        domain_data,
        "split",
        tmp_path,
        teachers=teachers,
        routing={"key": "domain", "map": {"even": "big", "odd": "small"}},
    )
    assert split[0] not in (only_big[0], only_small[0])
    records = read_metrics(tmp_path / "split")
    for r in records:
        assert r["teacher_big_rows"] + r["teacher_small_rows"] == 4  # batch_size rows per step
        assert r["teacher_big_share"] + r["teacher_small_share"] == pytest.approx(1.0)
        assert r["teacher_big_tokens"] + r["teacher_small_tokens"] == r["teacher_tokens_scored"]
        # each teacher's divergence, weighted by its tokens, makes up the step's
        parts = [(r[f"teacher_{t}_tokens"], r[f"teacher_{t}_divergence"]) for t in teachers]
        weighted = sum(n * d for n, d in parts if n)
        assert weighted / r["tokens"] == pytest.approx(r["divergence"], rel=1e-5)
    # the cost accounting: per-teacher totals, in the log and in the checkpoint
    last = records[-1]
    totals = load_trainer_state(latest_checkpoint(tmp_path / "split"))["totals"]["teachers"]
    for t in teachers:
        tokens = sum(r[f"teacher_{t}_tokens"] for r in records)
        assert last[f"total_teacher_{t}_tokens_scored"] == tokens == totals[t]["tokens_scored"]
        seconds = sum(r[f"teacher_{t}_seconds"] for r in records)
        assert totals[t]["seconds"] == pytest.approx(seconds) and seconds > 0
    # a teacher that got no rows: null divergence, no NaN anywhere in the log
    quiet = read_metrics(tmp_path / "to_big")
    assert all(r["teacher_small_divergence"] is None for r in quiet)
    assert "NaN" not in (tmp_path / "to_big" / "metrics.jsonl").read_text()


def test_routing_refusals_name_the_teachers(base_config, tiny_pair, domain_data):
    big = {"kind": "local", "path": str(tiny_pair[0])}
    teachers = {"big": big, "small": {"kind": "local", "path": str(tiny_pair[1])}}
    config = config_from_dict(
        base_config(
            preset="supervised_kd",
            data__train=str(domain_data),
            teacher={},
            teachers=teachers,
            routing={"key": "domain", "map": {"even": "big"}},
        )
    )
    with pytest.raises(ValueError, match=r"value 'odd' names no teacher.*'even'.*big, small"):
        preflight(config)
    with pytest.raises(ValueError, match=r"routing names teacher 'huge', not one of.*big, small"):
        config_from_dict(base_config(teacher={}, teachers=teachers, routing={"mix": {"huge": 1.0}}))
    remote = {"kind": "remote", "url": "http://127.0.0.1:9"}
    with pytest.raises(ValueError, match=r"teachers\.far \(kind remote\).*not full logits"):
        config_from_dict(
            base_config(
                preset="supervised_kd",
                teacher={},
                teachers={"big": big, "far": remote},
                routing={"mix": {"big": 1.0, "far": 1.0}},
            )
        )
    with pytest.raises(ValueError, match=r"teacher: .* or teachers: .*not both"):
        config_from_dict(base_config(teacher=big, teachers=teachers, routing={"mix": {"big": 1.0}}))


def test_fixed_mix_resumes_exactly_and_checks_the_manifest(
    base_config, tiny_pair, domain_data, tmp_path
):
    teachers = {
        "big": {"kind": "local", "path": str(tiny_pair[0])},
        "small": {"kind": "local", "path": str(tiny_pair[1])},
    }
    kw = {"teachers": teachers, "routing": {"mix": {"big": 1.0, "small": 1.0}}, "steps": 4}
    whole = run_losses(base_config, domain_data, "whole", tmp_path, **kw)
    run_losses(base_config, domain_data, "halves", tmp_path, **kw | {"steps": 2, "save_every": 2})
    resumed = run_losses(base_config, domain_data, "halves", tmp_path, **kw | {"resume": True})
    assert resumed == whole
    # the per-teacher cost totals carry over a resume
    per_teacher = [
        load_trainer_state(latest_checkpoint(tmp_path / run))["totals"]["teachers"]
        for run in ("whole", "halves")
    ]
    assert [{t: v["tokens_scored"] for t, v in p.items()} for p in per_teacher] == [
        {
            "big": per_teacher[0]["big"]["tokens_scored"],
            "small": per_teacher[0]["small"]["tokens_scored"],
        }
    ] * 2
    state = load_trainer_state(latest_checkpoint(tmp_path / "halves"))["teacher_state"]
    assert set(state["teachers"]) == {"big", "small"}
    config = config_from_dict(base_config(data__train=str(domain_data), teacher={}, **kw))
    routed = build_run(config).teacher
    with pytest.raises(ValueError, match="trained with teachers"):
        routed.load_checkpoint_state({"teachers": {"big": state["teachers"]["big"]}})
