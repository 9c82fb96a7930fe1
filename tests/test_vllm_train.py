"""The loop with `sampling.engine: vllm` and `teacher.kind: vllm`, end to end on CPU.

Runs share the session's engines (opd.sampling.vllm keeps one per model and log-prob mode);
each run pushes its own student into the student engine at start.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from opd.config.parse import config_from_dict
from opd.losses.sampled import policy_gradient_loss
from opd.run.checkpoint import latest_checkpoint
from opd.run.loop import train
from opd.run.metrics import read_metrics
from test_train import fixed_batch, reverse_kl_on
from vllm_util import SETTINGS, vllm_or_skip

vllm_or_skip()


def config(vllm_pair, data, out, **over) -> dict:
    teacher, student = vllm_pair
    cfg = {
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher)},
        "data": {"train": str(data), "max_prompt_tokens": 32},
        "steps": 8,
        "batch_size": 4,
        "micro_batch_size": 2,
        "sampling": {"max_new_tokens": 6, "engine": "vllm"},
        "optim": {"lr": 3e-3},
        "vllm": SETTINGS,
        "output_dir": str(out),
    }
    for key, value in over.items():
        node, parts = cfg, key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg


@pytest.mark.parametrize("preset", ["on_policy", "gkd"])
def test_presets_on_vllm_rollouts_lower_reverse_kl(preset, vllm_pair, addition_data, tmp_path):
    teacher, student = vllm_pair
    batch = fixed_batch(student, addition_data)
    start = reverse_kl_on(student, teacher, batch)
    drop = {}
    for engine in ("vllm", "lean"):
        cfg = config(vllm_pair, addition_data, tmp_path / engine, preset=preset)
        cfg["sampling"]["engine"] = engine
        cfg = config_from_dict(cfg)
        result = train(cfg)
        records = read_metrics(cfg.output_dir)
        assert len(records) == 8 and not any(r["skipped"] for r in records)
        drop[engine] = start - reverse_kl_on(latest_checkpoint(cfg.output_dir), teacher, batch)
    student_steps = [r for r in records_vllm(tmp_path) if r["sequences_from_student"]]
    assert student_steps and all(r["student_tokens_generated"] > 0 for r in student_steps)
    # vLLM's log q against the trainer's log p_S on the same tokens (float32 both)
    gaps = [r["sampler_logprob_gap"] for r in student_steps]
    assert all(0 <= g < 1e-3 for g in gaps), gaps
    assert result["totals"]["seconds"].get("time_weight_sync", 0) == 0  # lean: no pushes
    # both engines move the student toward the teacher, by a like amount
    assert drop["lean"] > 0 and drop["vllm"] > 0.5 * drop["lean"], drop


def records_vllm(tmp_path):
    return read_metrics(tmp_path / "vllm")


def test_skipped_weight_push_shows_as_sampler_gap(vllm_pair, addition_data, tmp_path, monkeypatch):
    """The gap metric sees a stale engine: without pushes, log q lags the trained student."""
    from opd.sampling.vllm import VllmSampler

    real = VllmSampler.push_weights
    calls = []

    def first_push_only(self, model):
        calls.append(1)
        if len(calls) == 1:
            real(self, model)

    monkeypatch.setattr(VllmSampler, "push_weights", first_push_only)
    cfg = config(vllm_pair, addition_data, tmp_path / "run", preset="on_policy", steps=4)
    cfg["optim"]["lr"] = 3e-2
    train(config_from_dict(cfg))
    gaps = [r["sampler_logprob_gap"] for r in read_metrics(tmp_path / "run")]
    assert gaps[0] < 1e-3 and gaps[-1] > 1e-2, gaps


def test_vllm_teacher_trains_pg_and_topk_as_the_local_teacher(vllm_pair, addition_data, tmp_path):
    """The same run with the teacher in a vLLM engine and as a local HF model: the student's
    vLLM rollouts are seeded alike, so both score the same sequences and every step's loss
    and divergence agree (float32 scores from two engines: 1e-4 relative)."""
    for name, loss in (
        ("pg", {"objective": "pg"}),
        ("topk", {"objective": "kd", "estimator": "topk", "topk": 8, "divergence": "jsd"}),
    ):
        runs = {}
        for kind in ("vllm", "local"):
            cfg = config(
                vllm_pair,
                addition_data,
                tmp_path / f"{name}-{kind}",
                teacher__kind=kind,
                loss=loss,
                source={"lmbda": 1.0},
                steps=3,
            )
            train(config_from_dict(cfg))
            runs[kind] = read_metrics(tmp_path / f"{name}-{kind}")
        records = runs["vllm"]
        assert [r["step"] for r in records] == [1, 2, 3]
        assert all(r["teacher_tokens_scored"] > 0 for r in records)
        for got, ref in zip(records, runs["local"], strict=True):
            assert got["student_tokens_generated"] == ref["student_tokens_generated"]
            for key in ("loss", "divergence"):
                assert math.isfinite(got[key]), (name, got)
                assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (name, key)


KILL_AT_STEP_2 = textwrap.dedent(
    """
    import os, signal, sys
    import opd.run.loop as loop
    from opd.config.parse import load_config

    real_save = loop._save

    def save_then_die(run, step, state):
        path = real_save(run, step, state)
        if step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    if __name__ == "__main__":
        loop._save = save_then_die
        loop.train(load_config(sys.argv[1]))
    """
)


def test_kill_9_then_resume_equals_uninterrupted(vllm_pair, addition_data, tmp_path):
    import yaml

    over = {"preset": "on_policy", "steps": 4, "save_every": 1}
    whole = config(vllm_pair, addition_data, tmp_path / "whole", **over)
    train(config_from_dict(whole))
    cut = config(vllm_pair, addition_data, tmp_path / "cut", **over)
    (tmp_path / "cut.yaml").write_text(yaml.safe_dump(cut))
    (tmp_path / "kill.py").write_text(KILL_AT_STEP_2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "kill.py"), str(tmp_path / "cut.yaml")],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000002"
    train(config_from_dict({**cut, "resume": True}))
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3, 4]
    a = load_file(str(latest_checkpoint(tmp_path / "whole") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "cut") / "model.safetensors"))
    for key in a:  # the same samples (per-row seeds) and the same updates
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_ratio_cap_truncates_weight_and_keeps_gradient_direction():
    student = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    sampler = torch.tensor([[-1.0, -4.0, -0.6]])  # ratios 1, e^2 = 7.39, e^0.1 = 1.105
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    full = policy_gradient_loss(student, adv, sampler)
    capped = policy_gradient_loss(student, adv, sampler, ratio_cap=3.0)
    assert torch.allclose(full[0, [0, 2]], capped[0, [0, 2]])
    assert torch.allclose(capped[0, 1], torch.tensor(-3.0))
    (g,) = torch.autograd.grad(capped.sum(), student)
    assert torch.allclose(g, torch.tensor([[-1.0, -3.0, 2.0 * 1.1052]]), atol=1e-4)


def test_two_processes_each_keep_their_own_engine(vllm_pair, addition_data, tmp_path):
    """torchrun, 2 CPU processes (DDP): each rank samples its own prompts on its own engine
    and pushes its (identical, all-reduced) student into it after every step."""
    from test_distributed import launch

    cfg = config(vllm_pair, addition_data, tmp_path / "ddp", preset="on_policy", steps=2)
    cfg["device"] = "cpu"
    records = read_metrics(launch(cfg, tmp_path))
    assert [r["step"] for r in records] == [1, 2]
    assert all(0 <= r["sampler_logprob_gap"] < 1e-3 for r in records)  # both engines current
    assert all(r["time_weight_sync"] > 0 for r in records)
