"""Rollouts beside training: what pipelining saves, and what staleness costs.

    python benchmarks/async_rollouts.py overlap      # a vLLM rollout server as its own process
    python benchmarks/async_rollouts.py staleness    # reverse KL over steps, lag 0 / 1 / 2
    python benchmarks/async_rollouts.py overlap --device cuda --server-gpu 0   # GPU (gpu_async.sh)

`overlap`: one `vllm serve` process holds the student (weights pushed after every optimizer
step, `vllm.weight_sync`); the same on-policy run (pg, tiny Llama pair of the tests, head
dim 32) trains `--steps` steps with `rollouts.mode=off` and then with `pipelined` (lag 1),
side by side on the same server. Per step (the first two left out: warm-up): wall time,
seconds sampling (the server's calls) and training (the rest), and
overlap = 1 - wall / (sample + train): 0 when the phases run in series, and
min(sample, train) / (sample + train) when the shorter one is hidden entirely; the issue's
goal is hiding >= 0.6 of the shorter phase, i.e. hidden = (sample + train - wall) /
min(sample, train) >= 0.6.

`staleness`: the in-process sampler, lags 0, 1, 2, each for a reverse-KL objective
(`minillm_like`: full-vocabulary reverse KL on student samples) and a forward-KL one (the
same on forward KL; AsyncOPD reports forward KL more robust to stale rollouts); every
`--eval-every` steps the reverse KL(student || teacher) on a held-out batch of dataset
completions. Same seeds everywhere: lag 0 is the serial run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tiny_task(root: Path) -> tuple[Path, Path, Path]:
    """(teacher, student, data): the vLLM-runnable tiny pair (head dim 32) and additions."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from opd.cli.demo.tiny import save_tiny_pair

    teacher, student = save_tiny_pair(
        root,
        teacher_kw={"hidden": 64, "heads": 2, "layers": 2},
        student_kw={"hidden": 32, "heads": 1, "layers": 2},
    )
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # a peaked teacher: distillation has a direction
    model.save_pretrained(teacher)
    for name, seed in (("train", 0), ("heldout", 1)):  # heldout: other additions
        rng = random.Random(seed)
        with (root / f"{name}.jsonl").open("w") as fh:
            for _ in range(256 if name == "train" else 64):
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                row = {"prompt": f"{a}+{b}=", "completion": f"{a + b}", "answer": str(a + b)}
                fh.write(json.dumps(row) + "\n")
    return teacher, student, root / "train.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, log: Path, args) -> tuple[subprocess.Popen, str]:
    """The README's rollout-server command, on 127.0.0.1."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype]
    cmd += ["--max-model-len", "256", "--logprobs-mode", "processed_logprobs"]
    if args.device == "cpu":
        cmd += ["--kv-cache-memory-bytes", str(1 << 28), "--compilation-config", '{"mode": 0}']
    else:
        cmd += ["--gpu-memory-utilization", "0.3"]
    if args.weight_sync == "nccl":
        cmd += ["--weight-transfer-config", '{"backend": "nccl"}']
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    if args.server_gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(args.server_gpu)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited; see {log}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"the vLLM server did not start in 900 s; see {log}")


def base_config(teacher, student, data, out, args, **over) -> dict:
    cfg = {
        "student": {"path": str(student)},  # float32 weights; bf16 below: the compute dtype
        "bf16": args.dtype == "bfloat16",
        "teacher": {"path": str(teacher), "dtype": args.dtype},
        "data": {"train": str(data), "max_prompt_tokens": 32},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "micro_batch_size": args.batch_size,
        "sampling": {"max_new_tokens": args.max_new_tokens, "n": 4},
        "optim": {"lr": args.lr},
        "output_dir": str(out),
        "device": args.device,
        "log_every": 1,
    }
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def overlap(args, root: Path) -> dict:
    from opd.config import config_from_dict
    from opd.run.loop import train
    from opd.run.metrics import read_metrics

    teacher, student, data = tiny_task(root / "models")
    # a running server of the same architecture will do: the first push sets its weights
    proc, url = (
        (None, args.server_url)
        if args.server_url
        else start_server(student, root / "server.log", args)
    )
    results = {}
    try:
        for mode in ("off", "pipelined"):
            cfg = base_config(
                teacher,
                student,
                data,
                root / mode,
                args,
                preset="on_policy",
                sampling={"engine": "vllm_server", "server_urls": [url]},
                vllm={"weight_sync": args.weight_sync},
                rollouts={"mode": mode, "lag": 1},
            )
            train(config_from_dict(cfg))
            records = read_metrics(root / mode)[2:]  # warm-up steps left out
            wall = statistics.mean(r["time_step"] for r in records)
            if mode == "off":  # in series: sampling is the generate phase
                sample = statistics.mean(r.get("time_generate", 0.0) for r in records)
                train_s = wall - sample
            else:
                sample = statistics.mean(r["time_sampling"] for r in records)
                train_s = statistics.mean(r["time_training"] for r in records)
            hidden = (sample + train_s - wall) / min(sample, train_s)
            results[mode] = {
                "step_s": round(wall, 4),
                "sample_s": round(sample, 4),
                "train_s": round(train_s, 4),
                "overlap": round(1 - wall / (sample + train_s), 3),
                "hidden_share_of_shorter_phase": round(hidden, 3),
                "gap_mean": statistics.mean(r["sampler_logprob_gap"] for r in records),
            }
            print(mode, results[mode], flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    results["speedup"] = round(results["off"]["step_s"] / results["pipelined"]["step_s"], 3)
    return results


def staleness(args, root: Path) -> dict:
    import torch

    from opd.config import config_from_dict
    from opd.data.batch import assemble
    from opd.data.encoding import Encoder
    from opd.data.rows import load_rows
    from opd.losses import token_divergence
    from opd.modeling.hf import completion_logits, load_causal_lm, load_tokenizer
    from opd.run.loop import train

    teacher_dir, student, data = tiny_task(root / "models")
    tok = load_tokenizer(str(student))
    enc = Encoder(tok, config_from_dict({"student": {"path": "x"}, "data": {"train": "x"}}).data)
    rows = load_rows(data.with_name("heldout.jsonl"))  # 64 additions drawn with another seed than train
    held = assemble(
        [enc.prompt_ids(r["prompt"]) for r in rows],
        [enc.completion_ids(r["completion"]) for r in rows],
        pad_id=tok.pad_token_id,
    )
    teacher = load_causal_lm(str(teacher_dir)).eval()
    with torch.no_grad():
        t_logits = completion_logits(teacher, held, 100_000)

    def reverse_kl(model) -> float:
        with torch.no_grad():
            s = completion_logits(model.eval(), held, 100_000)
        return token_divergence(s, t_logits, "reverse_kl")[held.loss_mask()].mean().item()

    results = {}
    for divergence in ("reverse_kl", "forward_kl"):
        for lag in args.lags:
            curve = []

            def probe(run, curve=curve):
                curve.append(round(reverse_kl(run.world.unwrap(run.student)), 4))
                return {"heldout_reverse_kl": curve[-1]}

            cfg = base_config(
                teacher_dir,
                student,
                data,
                root / f"{divergence}-lag{lag}",
                args,
                preset="minillm_like",
                loss={"divergence": divergence},
                rollouts={"mode": "pipelined", "lag": lag},
                eval_every=args.eval_every,
            )
            train(config_from_dict(cfg), extra_eval=probe)
            results[f"{divergence} lag {lag}"] = curve
            print(divergence, "lag", lag, curve, flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["overlap", "staleness"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--lags", type=int, nargs="+", default=[0, 1, 2], help="staleness: lags")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--server-gpu", default=None, help="CUDA_VISIBLE_DEVICES of the server")
    p.add_argument("--server-url", default="", help="use this running rollout server")
    p.add_argument("--weight-sync", default="filesystem", choices=["filesystem", "nccl"])
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    p.add_argument("--workdir", default="")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="opd-async-"))
    results = (overlap if args.part == "overlap" else staleness)(args, root)
    text = json.dumps({"part": args.part, "args": vars(args), "results": results}, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
