"""Guards on what a training step holds in memory.

At V = 65,536 a step of 8 rows x 64 sampled tokens would hold 512 x V float32 = 128 MB per
logits tensor on the plain path. The fused path works in tiles of at most 128 positions
x V (teacher scoring, full-vocabulary kd) or N x 16,384 (the student side of pg / top-k),
so the largest float tensor any op creates during the whole step (sampling, scoring, loss,
backward, update) must stay within one such tile: 128 x V x 4 B = 32 MB, a quarter of the
full logits. A `TorchDispatchMode` sees every op's output; its storage size counts (views
of a weight count as the weight, `V x H`, far below the bound).

Also: the previous micro-batch's teacher scores are released before the next is scored.
"""

import json
import math
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from opd.cli.demo.tiny import DEFAULT_CHARS, build_char_tokenizer, tiny_causal_lm
from opd.config import config_from_dict
from opd.evaluation.divergence import mean_divergences
from opd.modeling.hf import load_causal_lm
from opd.run.loop import train_step
from opd.run.metrics import PhaseTimer
from opd.run.setup import build_run
from opd.teachers.local import LocalTeacher

V = 65_536
ROWS, NEW_TOKENS = 8, 64
TILE_BYTES = 128 * V * 4  # the bound: one tile of 128 positions x V, float32


class LargestTensor(TorchDispatchMode):
    """Records the largest floating-point storage any op outputs while active."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.where = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                # an MKL-packed weight (opaque layout) has no storage to ask: its elements
                n = t.numel() * t.element_size() if t.is_mkldnn else t.untyped_storage().nbytes()
                if n > self.nbytes:
                    self.nbytes, self.where = n, (str(func), tuple(t.shape))
        return out


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory):
    """A tiny Llama pair whose tokenizer has V = 65,536 real tokens (characters past ASCII
    fill it), so no logits are cut to a short vocabulary."""
    root = tmp_path_factory.mktemp("wide")
    codes = (c for c in range(0x4E00, 0x30000) if not 0xD800 <= c < 0xE000)  # no surrogates
    filler = "".join(chr(next(codes)) for _ in range(V - 3 - len(DEFAULT_CHARS)))
    tok = build_char_tokenizer(DEFAULT_CHARS + filler)
    assert len(tok) == V
    dirs = []
    for name, hidden, seed in (("teacher", 48, 1), ("student", 32, 2)):
        model = tiny_causal_lm(V, hidden=hidden, layers=2, seed=seed,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(root / name)
    rows = root / "train.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "completion": f"{2 * i}",
                                        "answer": f"{2 * i}"}) + "\n"
                            for i in range(ROWS)))  # fmt: skip
    return dirs[0], dirs[1], rows


def _run(wide_pair, tmp_path, reward=None, **loss):
    teacher, student, rows = wide_pair
    config = {
        "reward": reward or {},
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher)},
        "data": {"train": str(rows), "chat_template": "off"},
        "source": {"lmbda": 1.0},
        "sampling": {"max_new_tokens": NEW_TOKENS},
        "loss": loss,
        "batch_size": ROWS,
        "micro_batch_size": ROWS,
        "steps": 1,
        "device": "cpu",
        "output_dir": str(tmp_path / "run"),
    }
    return build_run(config_from_dict(config))


# RL + KD: a reward on the student's samples mixed with top-k kd (every row rewarded 0 or 1)
RL = {"function": "exact_match", "distill_weight": 0.5, "normalize": "none"}
STEPS = {
    "pg": ({"objective": "pg"}, None),
    "topk": ({"objective": "kd", "estimator": "topk", "topk": 8, "divergence": "reverse_kl"}, None),
    "full": ({"objective": "kd", "divergence": "forward_kl"}, None),
    "rl+topk": ({"objective": "kd", "estimator": "topk", "topk": 8}, RL),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_fused_step_holds_no_tokens_by_vocab_tensor(wide_pair, tmp_path, name):
    loss, reward = STEPS[name]
    run = _run(wide_pair, tmp_path, reward, **loss)
    assert run.path.fused
    with LargestTensor() as largest:
        record = train_step(run, 0, PhaseTimer())
    tokens = record["tokens"]
    assert tokens >= 4 * 128  # a [tokens, V] tensor would be >= 4x the bound
    assert largest.nbytes <= TILE_BYTES, (largest.nbytes / 2**20, largest.where)


@pytest.mark.parametrize("fused", [True, False])
def test_ddp_step_holds_no_tokens_by_vocab_tensor_on_any_rank(wide_pair, tmp_path, fused):
    """The same bound on each rank of a 2-process DDP run (gloo, CPU): the fused objective
    runs through DDP's forward, so the wrapper must not bring [tokens, V] back. The plain
    path is the guard's own check: there each rank's logits exceed it."""
    teacher, student, rows = wide_pair
    config = {
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher)},
        "data": {"train": str(rows), "chat_template": "off"},
        "source": {"lmbda": 1.0},
        "sampling": {"max_new_tokens": NEW_TOKENS},
        "loss": {"objective": "kd", "estimator": "topk", "topk": 8, "fused": fused},
        "batch_size": ROWS,
        "micro_batch_size": ROWS // 2,
        "steps": 1,
        "device": "cpu",
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    worker = Path(__file__).with_name("step_memory_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", port, str(worker), str(path), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["kind"] == "ddp" and got["fused"] is fused
        assert got["tokens"] >= 2 * 128  # a [tokens, V] tensor would be >= 2x the bound
        if fused:
            assert got["nbytes"] <= TILE_BYTES, (rank, got["nbytes"] / 2**20, got["where"])
        else:
            assert got["nbytes"] > 2 * TILE_BYTES, (rank, got)  # this rank's [tokens, V]


def test_plain_step_does_exceed_the_bound(wide_pair, tmp_path):
    """The guard's own check: the plain path's [tokens, V] logits are seen."""
    run = _run(wide_pair, tmp_path, objective="pg", fused=False)
    with LargestTensor() as largest:
        record = train_step(run, 0, PhaseTimer())
    assert largest.nbytes >= record["tokens"] * V * 4




def test_evaluation_divergences_hold_no_positions_by_vocab_tensor(wide_pair):
    """The exposure-bias probe on 8 x 64 completion tokens: logits 128 positions at a time."""
    teacher_dir, student_dir, _ = wide_pair
    student = load_causal_lm(str(student_dir))
    teacher = LocalTeacher(load_causal_lm(str(teacher_dir)), V)
    g = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7]] * ROWS
    completions = torch.randint(3, V, (ROWS, NEW_TOKENS), generator=g).tolist()
    with LargestTensor() as largest:
        out = mean_divergences(
            student, teacher, prompts, completions, pad_id=0, vocab_size=V,
            kinds=("forward_kl", "reverse_kl", "tvd"),
        )  # fmt: skip
    assert all(math.isfinite(v) and v > 0 for v in out.values())
    assert largest.nbytes <= TILE_BYTES, (largest.nbytes / 2**20, largest.where)


def test_previous_scores_released_before_the_next_micro_batch_is_scored(base_config, monkeypatch):
    """Plain full-vocabulary kd: each micro-batch's teacher logits are [B, L, V]; two alive
    at once double the step's peak."""
    run = build_run(config_from_dict(base_config(loss__fused=False, steps=1)))
    assert run.config.accumulation >= 2
    refs, alive = [], []
    score = run.teacher.score

    def recording(*args, **kwargs):
        alive.append([r() is not None for r in refs])
        scores = score(*args, **kwargs)
        refs.append(weakref.ref(scores.logits))
        return scores

    monkeypatch.setattr(run.teacher, "score", recording)
    train_step(run, 0, PhaseTimer())
    assert len(alive) == run.config.accumulation
    assert not any(any(a) for a in alive)
