"""Asynchronous rollouts (`rollouts.mode`): lag 0 is the serial loop, a pipelined run resumes
exactly after kill -9, stale samples keep the log q of the weights that drew them, and queue
mode drops exactly the batches older than `rollouts.max_staleness`."""

import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opd.config import config_from_dict
from opd.losses import policy_gradient_loss
from opd.modeling.hf import completion_logits, load_causal_lm
from opd.run.checkpoint import latest_checkpoint, load_trainer_state
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.rollouts import Drawn, Rollouts, _batch_from_state
from opd.run.setup import build_run
from opd.sampling.reference import process_logits


def _weights(ckpt):
    return load_file(str(Path(ckpt) / "model.safetensors"))


def _same_weights(a_dir, b_dir):
    a, b = _weights(latest_checkpoint(a_dir)), _weights(latest_checkpoint(b_dir))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def on_policy(base_config, out, **kw):
    # pg on student samples: every batch is sampled, so the lag shows in every step
    return base_config(preset="on_policy", output_dir=str(out), **kw)


def test_lag_zero_equals_the_serial_loop_bit_for_bit_and_lag_one_does_not(base_config, tmp_path):
    train(config_from_dict(on_policy(base_config, tmp_path / "a", steps=3)))
    for lag in (0, 1):
        cfg = on_policy(
            base_config, tmp_path / f"lag{lag}", steps=3, rollouts={"mode": "pipelined", "lag": lag}
        )
        train(config_from_dict(cfg))
    _same_weights(tmp_path / "a", tmp_path / "lag0")
    ra, r0, r1 = (read_metrics(tmp_path / d) for d in ("a", "lag0", "lag1"))
    assert [r["loss"] for r in ra] == [r["loss"] for r in r0]
    assert [r["staleness_max"] for r in r0] == [0, 0, 0]
    # with the weights that drew them, the ratio is 1 and the gap 0 (the same HF forward)
    assert all(abs(r["ratio_mean"] - 1) < 1e-5 and r["sampler_logprob_gap"] < 1e-5 for r in r0)
    # lag 1: steps 0 and 1 both train on batches drawn with the initial weights
    assert [r["staleness_max"] for r in r1] == [0, 1, 1]
    assert ra[0]["loss"] == r1[0]["loss"] and ra[2]["loss"] != r1[2]["loss"]
    assert abs(r1[1]["ratio_mean"] - 1) > 1e-4 and math.isfinite(r1[1]["ratio_max"])
    for r in r1:
        assert r["dropped_samples"] == 0
        assert r["time_sampling"] > 0 and r["time_training"] > 0 and r["time_waiting"] >= 0


def test_stale_batch_keeps_q_of_the_weights_that_drew_it(base_config, tmp_path):
    """The batch of step 3 is drawn at the start of step 2 with the weights after step 1:
    its log q must be theirs, and step 3's logged ratio p/q must use that q, not the
    trained weights' (for which the ratio would be exactly 1)."""
    cfg = on_policy(
        base_config,
        tmp_path / "r",
        steps=3,
        save_every=1,
        keep_checkpoints=5,
        sampling={"max_new_tokens": 6, "temperature": 0.8, "top_k": 20},
        rollouts={"mode": "pipelined", "lag": 1},
    )
    train(config_from_dict(cfg))
    ckpts = Path(cfg["output_dir"]) / "checkpoints"
    state = load_trainer_state(ckpts / "step-0000002")["rollouts"]
    (drawn,) = state["ranks"][0]["ready"]
    assert drawn["slot"] == 2 and drawn["version"] == 1
    run = build_run(config_from_dict({**cfg, "output_dir": str(tmp_path / "x")}))
    s = run.config.sampling
    older = load_causal_lm(str(ckpts / "step-0000001")).eval()
    newer = load_causal_lm(str(ckpts / "step-0000002")).eval()
    ratios = []
    for m, b in enumerate(drawn["batches"]):
        batch = _batch_from_state(b, [])
        mask, ids = batch.loss_mask(), batch.completion_ids()
        logq = batch.sampler_logprobs[:, batch.prompt_width :]
        with torch.no_grad():
            for model, expect_equal in ((older, True), (newer, False)):
                logits = completion_logits(model, batch, run.vocab_size)
                lp = process_logits(logits, s.temperature, s.top_k, s.top_p)
                mine = lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                gap = (mine - logq).abs()[mask].max().item()
                assert (gap < 1e-5) == expect_equal, (m, gap)
            raw = torch.log_softmax(completion_logits(newer, batch, run.vocab_size).double(), -1)
            raw = raw.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            ratios.append(torch.exp(raw - logq.double())[mask])
    ratio = torch.cat(ratios)
    record = read_metrics(cfg["output_dir"])[2]
    assert record["ratio_mean"] == pytest.approx(ratio.mean().item(), rel=1e-5)
    assert record["ratio_max"] == pytest.approx(ratio.max().item(), rel=1e-5)
    assert abs(record["ratio_mean"] - 1) > 1e-4


def test_icepop_masks_and_tis_truncates_against_float64():
    torch.manual_seed(0)
    lp = torch.randn(3, 5, dtype=torch.float64).log_softmax(-1).requires_grad_()
    q = lp.detach() + 0.8 * torch.randn(3, 5, dtype=torch.float64)
    adv = torch.randn(3, 5, dtype=torch.float64)
    ratio = torch.exp(lp.detach() - q)
    assert (ratio > 2).any() and (ratio < 0.5).any()  # both bounds cut some tokens here
    for correction, keep in (
        ("icepop", (ratio >= 0.5) & (ratio <= 2.0)),
        ("tis", torch.ones_like(ratio, dtype=torch.bool)),
    ):
        loss = policy_gradient_loss(lp, adv, q, 2.0, correction, 0.5)
        (grad,) = torch.autograd.grad(loss.sum(), lp)
        weight = ratio.clamp(max=2.0) if correction == "tis" else ratio
        torch.testing.assert_close(loss.detach(), torch.where(keep, -weight * adv, 0.0))
        torch.testing.assert_close(grad, torch.where(keep, -weight * adv, 0.0))


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import opd.run.loop as loop
    import opd.run.rollouts as rollouts
    from opd.config import load_config

    kill_step, kill_phase = int(sys.argv[2]), sys.argv[3]

    def die_at(phase, step):
        if (step, phase) == (kill_step, kill_phase):
            os.kill(os.getpid(), signal.SIGKILL)

    real_batches, real_update = rollouts.Rollouts.batches_for, rollouts.Rollouts.after_update
    real_optimizer_step, real_save = loop.optimizer_step, loop._save

    def batches_for(self, step, timer):
        out = real_batches(self, step, timer)
        die_at("drawn", step)
        return out

    def after_update(self, updated):
        die_at("before_push", self.version)
        real_update(self, updated)
        die_at("after_push", self.version - 1)

    def save(run, step, state):
        path = real_save(run, step, state)
        die_at("saved", step - 1)
        return path

    if __name__ == "__main__":
        rollouts.Rollouts.batches_for, rollouts.Rollouts.after_update = batches_for, after_update
        loop._save = save
        loop.train(load_config(sys.argv[1]))
    """
)


def test_pipelined_run_killed_then_resumed_equals_uninterrupted(base_config, tmp_path):
    """kill -9 at a random step and moment (drawn, before or after the weight push, after
    the checkpoint); the resumed run ends with the uninterrupted run's weights and losses."""
    steps = 5
    kw = {"steps": steps, "save_every": 1, "rollouts": {"mode": "pipelined", "lag": 1}}
    train(config_from_dict(on_policy(base_config, tmp_path / "a", **kw)))
    rng = random.Random(time.time_ns())
    kill_step = rng.randrange(1, steps - 1)
    kill_phase = rng.choice(["drawn", "before_push", "after_push", "saved"])
    where = f"killed at step {kill_step}, {kill_phase}"
    cfg = on_policy(base_config, tmp_path / "b", **kw)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, str(tmp_path / "kill.py"), str(tmp_path / "b.yaml")]
    proc = subprocess.run(
        [*args, str(kill_step), kill_phase], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, (where, proc.stderr[-2000:])
    done = int(latest_checkpoint(tmp_path / "b").name.removeprefix("step-"))
    assert done == kill_step + (kill_phase == "saved"), where
    train(config_from_dict({**cfg, "resume": True}))
    _same_weights(tmp_path / "a", tmp_path / "b")
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb][-len(ra) :], where


def test_queue_takes_only_batches_within_max_staleness(base_config, tmp_path):
    cfg = on_policy(base_config, tmp_path / "q", rollouts={"mode": "queue", "max_staleness": 1})
    run = build_run(config_from_dict(cfg))
    rollouts = Rollouts(run)
    rollouts._queue = __import__("queue").Queue()
    versions = [0, 0, 1, 3, 1, 2, 3, 4, 4]
    for slot, v in enumerate(versions):  # two samples per batch (micro_batch_size=2)
        batch = _batch_from_state(
            {
                "input_ids": torch.zeros(2, 3, dtype=torch.long),
                "attention_mask": torch.ones(2, 3, dtype=torch.long),
                "completion_mask": torch.ones(2, 3, dtype=torch.long),
                "prompt_width": 1,
                "source": "student",
                "sampler_logprobs": torch.zeros(2, 3),
            },
            [],
        )
        rollouts._queue.put(Drawn(slot, v, [batch]))
    taken, dropped = [], []
    for step in (0, 2, 4, 5):
        drawn_before = rollouts.dropped
        d = rollouts._from_queue(step)
        taken.append((step, d.slot))
        dropped.append(rollouts.dropped - drawn_before)
    # step 2 accepts version >= 1: slots 1 (v0) dropped, slot 2 taken; step 4 accepts >= 3:
    # slot 3 taken; step 5 accepts >= 4: slots 4, 5, 6 (v1, v2, v3) dropped, slot 7 taken.
    assert taken == [(0, 0), (2, 2), (4, 3), (5, 7)]
    assert dropped == [0, 2, 0, 6]


def test_queue_mode_trains_and_counts(base_config, tmp_path):
    cfg = on_policy(
        base_config, tmp_path / "q", steps=4, rollouts={"mode": "queue", "max_staleness": 1}
    )
    train(config_from_dict(cfg))
    records = read_metrics(cfg["output_dir"])
    assert len(records) == 4
    for r in records:
        assert 0 <= r["staleness_max"] <= 1 and r["dropped_samples"] % 2 == 0
        assert math.isfinite(r["loss"])


@pytest.mark.parametrize("weights", ["ema", "live"])
def test_queue_refuses_a_self_teacher_that_follows_the_student(weights, base_config):
    cfg = base_config(preset="sdft", teacher={"self_weights": weights}, rollouts={"mode": "queue"})
    with pytest.raises(ValueError, match=r"rollouts\.mode=queue with teacher\.self_weights"):
        config_from_dict(cfg)
    config_from_dict({**cfg, "rollouts": {"mode": "pipelined"}})  # pipelined keeps it exact


def test_rollouts_config_reads_yaml_off_and_refuses_no_student_samples(base_config):
    assert (
        config_from_dict(base_config(rollouts=yaml.safe_load("mode: off"))).rollouts.mode == "off"
    )
    with pytest.raises(ValueError, match=r"source\.lmbda=0 samples nothing"):
        config_from_dict(base_config(preset="supervised_kd", rollouts={"mode": "pipelined"}))


def test_two_process_pipelined_run_resumes_each_ranks_rollouts(tiny_pair, addition_data, tmp_path):
    """DDP over 2 processes, lag 1: each rank's drawn batches go into the checkpoint (gathered
    on rank 0) and come back to that rank, so the resumed run equals the uninterrupted one."""
    from test_distributed import _check_resume, _config, _resume_from_step, launch

    extra = {
        "preset": "on_policy",
        "save_every": 1,
        "keep_checkpoints": 3,
        "rollouts": {"mode": "pipelined", "lag": 1},
    }
    full = launch(_config(tiny_pair, addition_data, tmp_path / "full", **extra), tmp_path)
    assert [r["staleness_max"] for r in read_metrics(full)] == [0, 1, 1]
    saved = load_trainer_state(full / "checkpoints" / "step-0000001")["rollouts"]
    ranks = saved["ranks"]
    assert len(ranks) == 2 and [r["ready"][0]["slot"] for r in ranks] == [1, 1]
    ids = [r["ready"][0]["batches"][0]["input_ids"] for r in ranks]
    assert not torch.equal(ids[0], ids[1])  # each rank's own prompts and samples
    _resume_from_step(full, tmp_path / "resumed", 1)
    cfg = _config(tiny_pair, addition_data, tmp_path / "resumed", resume=True, **extra)
    _check_resume(full, launch(cfg, tmp_path))


def test_reward_pg_term_takes_the_ratio_correction_too():
    from opd.config.sections import LossConfig
    from opd.objectives.rl import reward_pg_loss

    torch.manual_seed(1)
    lp = torch.randn(2, 4, dtype=torch.float64).log_softmax(-1)
    q = lp + 0.8 * torch.randn(2, 4, dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    ratio = torch.exp(lp - q)
    icepop = LossConfig(objective="pg", ratio_correction="icepop", ratio_floor=0.5, ratio_cap=2.0)
    keep = (ratio >= 0.5) & (ratio <= 2.0)
    assert (~keep).any()
    expect = torch.where(keep, -ratio * adv[:, None], 0.0)
    torch.testing.assert_close(reward_pg_loss(lp, adv, q, icepop), expect)
    tis = LossConfig(objective="pg", ratio_cap=2.0)
    torch.testing.assert_close(reward_pg_loss(lp, adv, q, tis), -ratio.clamp(max=2.0) * adv[:, None])
