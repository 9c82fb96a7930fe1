"""Multi-process training (issue 8): 2 CPU processes over gloo, tiny models.

DDP runs are launched with `torchrun`, FSDP runs with `accelerate launch --use_fsdp`
(accelerate does not shard on CPU, so opd shards with torch FSDP2 itself; see
`opd.run.world`). A run over W processes must equal the single-process run on the same
global batch: the single run uses `micro_batch_size = W * m` so its lambda draws (one per
global micro-batch) are the same ones.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opd.config.parse import config_from_dict
from opd.run.checkpoint import latest_checkpoint, load_trainer_state
from opd.run.loop import train
from opd.run.metrics import PhaseTimer, read_metrics
from opd.run.setup import build_run
from opd.run.sources import make_micro_batch, step_seed
from opd.run.world import World
from serve_util import TOKEN, start_server

TIMEOUT_S = 240  # per launch; a launch takes ~20 s on 2 idle cores
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _config(tiny_pair, data, out, **extra) -> dict:
    teacher, student = tiny_pair
    cfg = {
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher)},
        "data": {"train": str(data)},
        "steps": 3,
        "batch_size": 4,
        "micro_batch_size": 2,
        "sampling": {"max_new_tokens": 6},
        "optim": {"lr": 1e-3},
        "output_dir": str(out),
        "device": "cpu",
    }
    for key, value in extra.items():
        node, parts = cfg, key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(cfg: dict, tmp_path: Path, *, fsdp: bool = False) -> Path:
    """`opd train` on 2 processes; returns the run directory."""
    path = tmp_path / f"{Path(cfg['output_dir']).name}-{cfg['steps']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = _free_port()
    if fsdp:
        cmd = [str(ACCELERATE), "launch", "--use_fsdp", "--fsdp_version", "2"]
        cmd += ["--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
        cmd += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
        cmd += ["--dynamo_backend", "no", "--main_process_port", port, "-m", "opd.cli"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", port, "-m", "opd.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [*cmd, "train", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count('"step":') == 1, "only rank 0 prints the JSON summary"
    if fsdp:  # accelerate's FSDP2 wrapping: root, embeddings, 2 decoder layers, norm, head
        assert "in 6 FSDP units" in proc.stderr, proc.stderr[-2000:]
    return Path(cfg["output_dir"])


def _weights(run_dir) -> dict:
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single_run(tiny_pair, addition_data, tmp_path_factory):
    """The 1-process reference: global batch 4 in one micro-batch of 4, the plain path."""
    out = tmp_path_factory.mktemp("single") / "run"
    cfg = _config(
        tiny_pair, addition_data, out, preset="supervised_kd", micro_batch_size=4, loss__fused=False
    )
    train(config_from_dict(cfg))
    return out


def test_ranks_take_disjoint_slices_of_each_global_micro_batch(tiny_pair, addition_data, tmp_path):
    cfg = _config(tiny_pair, addition_data, tmp_path / "r", preset="supervised_kd", batch_size=8)
    run = build_run(config_from_dict(cfg))  # 1 process; ranks are played by World objects
    timer = PhaseTimer()
    single = [make_micro_batch(run, 1, m, timer).rows for m in range(4)]  # 4 x 2 prompts
    for micro in range(2):  # 2 processes: 2 global micro-batches of 2 x 2 prompts
        slices = []
        for rank in range(2):
            run.world = World(rank=rank, size=2)
            slices.append(make_micro_batch(run, 1, micro, timer).rows)
        assert slices[0] + slices[1] == single[2 * micro] + single[2 * micro + 1]
    with pytest.raises(ValueError, match="micro_batch_size x processes = 2 x 8"):
        World(rank=0, size=8).accumulation(run.config)
    # Rank 0 keeps the single-process seeds (bit-identical runs); other ranks differ.
    assert step_seed(3, 5, 1) == (3 * 1_000_003 + 5 * 1_009 + 1)
    assert len({step_seed(3, 5, 1, rank) for rank in range(8)}) == 8


def test_two_process_ddp_equals_single_process(single_run, tiny_pair, addition_data, tmp_path):
    cfg = _config(tiny_pair, addition_data, tmp_path / "ddp", preset="supervised_kd")
    out = launch(cfg, tmp_path)
    # the fused objective, run as DDP's forward, equals the plain single-process run
    assert json.loads((out / "run_path.json").read_text())["objective"] == "fused_full"
    assert max_diff(_weights(out), _weights(single_run)) < 1e-5
    ddp, ref = read_metrics(out), read_metrics(single_run)
    assert len(ddp) == 3  # rank 0 alone writes metrics
    for a, b in zip(ddp, ref, strict=True):
        assert a["tokens"] == b["tokens"] and a["sequences_from_dataset"] == 4
        assert a["teacher_tokens_scored"] == b["teacher_tokens_scored"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def _resume_from_step(src: Path, dst: Path, step: int) -> None:
    """`dst`: a copy of run `src` as it was right after saving `step`."""
    name = f"step-{step:07d}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / "latest").write_text(name)
    lines = (src / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines[:step]))


def _check_resume(first: Path, resumed: Path) -> None:
    a, b = _weights(first), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_metrics(first)] == [r["loss"] for r in read_metrics(resumed)]


def test_two_process_ddp_resume_equals_uninterrupted(tiny_pair, addition_data, tmp_path):
    """GKD with student samples: each rank samples with its own seed from the inner module."""
    extra = {"preset": "gkd", "save_every": 1, "keep_checkpoints": 3}
    cfg = _config(tiny_pair, addition_data, tmp_path / "full", **extra)
    full = launch(cfg, tmp_path)
    records = read_metrics(full)
    assert sum(r["sequences_from_student"] for r in records) > 0
    assert all(r["sequences_from_student"] + r["sequences_from_dataset"] == 4 for r in records)
    _resume_from_step(full, tmp_path / "resumed", 1)
    cfg = _config(tiny_pair, addition_data, tmp_path / "resumed", resume=True, **extra)
    _check_resume(full, launch(cfg, tmp_path))


def test_fsdp_equals_single_process_and_saves_a_loadable_model(
    single_run, tiny_pair, addition_data, tmp_path
):
    """Also with gradient checkpointing under FSDP: recomputing the sharded layers' activations
    leaves the step where the plain single-process run leaves it. Under transformers
    5.16-5.19 the teacher of rank 1 was zeros here (opd.modeling.hf.every_rank_reads_weights)."""
    cfg = _config(
        tiny_pair,
        addition_data,
        tmp_path / "fsdp",
        preset="supervised_kd",
        student__gradient_checkpointing=True,
    )
    out = launch(cfg, tmp_path, fsdp=True)
    assert json.loads((out / "run_path.json").read_text())["objective"] == "fused_full"
    assert max_diff(_weights(out), _weights(single_run)) < 1e-5
    model = AutoModelForCausalLM.from_pretrained(latest_checkpoint(out))
    ref = AutoModelForCausalLM.from_pretrained(latest_checkpoint(single_run))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_fsdp_sharded_teacher_samples_in_lockstep_and_resumes(tiny_pair, addition_data, tmp_path):
    """Student and teacher sharded; both sample (ranks stop at different lengths, so
    forwards run in lock-step); the gathered optimizer state resumes exactly."""
    extra = {
        "preset": "gkd",
        "source__off_policy": "teacher",
        "teacher__shard": True,
        "micro_batch_size": 1,
        "steps": 2,
        "save_every": 1,
        "keep_checkpoints": 3,
    }
    cfg = _config(tiny_pair, addition_data, tmp_path / "full", **extra)
    full = launch(cfg, tmp_path, fsdp=True)
    records = read_metrics(full)
    assert sum(r["teacher_tokens_generated"] for r in records) > 0
    assert sum(r["student_tokens_generated"] for r in records) > 0
    state = load_trainer_state(latest_checkpoint(full))
    assert sorted(state["optimizer"]["state"]) == list(range(len(_weights(full))))
    _resume_from_step(full, tmp_path / "resumed", 1)
    cfg = _config(tiny_pair, addition_data, tmp_path / "resumed", resume=True, **extra)
    _check_resume(full, launch(cfg, tmp_path, fsdp=True))


def test_remote_teacher_serves_both_processes(tiny_pair, addition_data, tmp_path, monkeypatch):
    """The teacher on its own worker (`opd serve`, or vLLM): each rank is a client, and the
    2-process run equals the 1-process run against the same server."""
    server, _ = start_server(tiny_pair[0])
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    extra = {
        "preset": "supervised_kd",
        "loss__estimator": "topk",
        "loss__topk": 8,
        "teacher__kind": "remote",
        "teacher__path": "",
        "teacher__url": server.url,
        "data__max_prompt_tokens": 32,  # within the test server's max_seq_len (64)
        "data__max_completion_tokens": 16,
    }
    try:
        out = launch(_config(tiny_pair, addition_data, tmp_path / "two", **extra), tmp_path)
        ref = _config(tiny_pair, addition_data, tmp_path / "one", micro_batch_size=4, **extra)
        train(config_from_dict(ref))
    finally:
        server.stop()
    assert max_diff(_weights(out), _weights(tmp_path / "one")) < 1e-5
    for a, b in zip(read_metrics(out), read_metrics(tmp_path / "one"), strict=True):
        assert a["teacher_tokens_scored"] == b["teacher_tokens_scored"] == a["tokens"] > 0
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker process with RANK=`rank` among `launcher`'s descendants."""
    todo = [launcher]
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        if pid != launcher and f"RANK={rank}".encode() in env:
            return pid
        todo += [int(k) for k in kids]
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers via /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(base_config, tmp_path):
    """A SIGTERM that reaches one rank alone: the ranks agree (one all-reduce per step) and
    all save the same step's checkpoint and stop; without the agreement the signalled rank
    runs the save's collectives while the other starts the next step's, and the run hangs
    or dies."""
    cfg = base_config(preset="supervised_kd", steps=400, device="cpu", save_every=0)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", _free_port(), "-m", "opd.cli", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines, deadline = [], time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:  # rank 0's progress: both ranks are training
            lines.append(proc.stderr.readline())
            if lines[-1].startswith("step 2/"):
                break
        worker = _rank_pid(proc.pid, 1)
        assert worker is not None, "".join(lines)
        os.kill(worker, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)  # a hang without the agreement
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(lines) + stderr
    assert proc.returncode != 0, stderr  # torchrun reports the workers' exit 143
    stopped = [line for line in stderr.splitlines() if line.startswith("opd: stopped: SIGTERM")]
    assert len(stopped) == 1, stderr[-4000:]  # rank 0 says it, for both
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1, stderr[-4000:]
    step = int(ckpts[0].name.split("-")[1])
    assert 2 <= step < 400 and f"at step {step}: saved checkpoint" in stopped[0]
    assert len(read_metrics(tmp_path / "run")) == step
    state = load_trainer_state(ckpts[0])
    assert state["step"] == step
