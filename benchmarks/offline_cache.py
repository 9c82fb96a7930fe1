"""Training from the offline teacher cache vs the same supervised-KD run with a live teacher.

    python benchmarks/offline_cache.py                 # 30 steps, teacher 512x4 (~8x) vs 256x2
    python benchmarks/offline_cache.py --quick         # 10 steps, fewer rows
    python benchmarks/offline_cache.py --student 256x4 --teacher 512x4     # teacher 4x
    python benchmarks/offline_cache.py --device cuda --steps 100

Side by side, on identical batches (same student, data, order and seed):

  live_topk   teacher.kind=local, loss.estimator=topk, loss.topk=K: the teacher model is
              loaded and runs a forward pass on every micro-batch
  live_full   the `supervised_kd` preset (full-vocabulary forward KL), live teacher
  cached      teacher.kind=cached, loss.estimator=topk, loss.topk=K: `opd score` wrote the
              teacher's top-K log-probs once; training never loads the teacher

Time per step is the median (and the best) of the loop's own `time_step` (metrics.jsonl),
first step excluded (warm-up); on a shared machine the best is the steadier figure. The
one-off cost of writing the cache is reported separately, with the cache's bytes per token.
The step-1 losses of live_topk and cached must agree (same batch, same top-K; fp16
storage), which the script checks.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from opd.cli.demo.tiny import build_char_tokenizer, tiny_causal_lm
from opd.config.parse import config_from_dict
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.teachers.cache.generate import CacheSpec, build_cache

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            words = " ".join(rng.choice(WORDS) for _ in range(8))
            row = {"prompt": f"add {a} and {b}:", "completion": f"{words} so {a}+{b}={a + b}."}
            fh.write(json.dumps(row) + "\n")


def build_models(root: Path, student_kw: dict, teacher_kw: dict) -> tuple[Path, Path, dict]:
    tok = build_char_tokenizer()
    sizes = {}
    for name, kw, seed in (("teacher", teacher_kw, 1), ("student", student_kw, 2)):
        model = tiny_causal_lm(
            len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, seed=seed, **kw
        )
        sizes[name] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "teacher", root / "student", sizes


def run(name: str, base: dict, root: Path, **over) -> dict:
    data = json.loads(json.dumps(base))
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    data["output_dir"] = str(root / name)
    config = config_from_dict(data)
    t0 = time.perf_counter()
    train(config)
    wall = time.perf_counter() - t0
    records = read_metrics(config.output_dir)
    steps = [r["time_step"] for r in records[1:]]
    teacher = [r.get("time_teacher_score", 0.0) for r in records[1:]]
    return {
        "name": name,
        "step_s": statistics.median(steps),
        "step_best_s": min(steps),
        "teacher_score_s": statistics.median(teacher),
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--student", default="256x2", help="hidden x layers of the student")
    parser.add_argument("--teacher", default="512x4", help="hidden x layers of the teacher")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rows = 10, 128
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="opd-bench-cache-"))
    student_kw, teacher_kw = (
        dict(zip(("hidden", "layers"), map(int, arg.split("x"))), heads=4)
        for arg in (args.student, args.teacher)
    )
    teacher, student, sizes = build_models(root, student_kw, teacher_kw)
    pairs = root / "pairs.jsonl"
    write_pairs(pairs, args.rows)

    cache = root / "cache"
    t0 = time.perf_counter()
    spec = CacheSpec(mode="score", topk=args.topk, shard_size=128)
    manifest = build_cache(str(teacher), pairs, cache, spec, batch_size=32, device=args.device)
    cache_s = time.perf_counter() - t0

    base = {
        "student": {"path": str(student)},
        "data": {"train": str(cache)},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "micro_batch_size": args.batch_size,
        "optim": {"lr": 1e-3},
        "device": args.device,
        "log_every": 1,
    }
    k = manifest["spec"]["topk"]
    live_teacher = {"kind": "local", "path": str(teacher)}
    topk_loss = {"objective": "kd", "divergence": "forward_kl", "estimator": "topk", "topk": k}
    results = [
        run("live_topk", base, root, teacher=live_teacher, loss=topk_loss),
        run("live_full", base, root, preset="supervised_kd", teacher=live_teacher),
        run(
            "cached",
            base,
            root,
            teacher={"kind": "cached", "cache_dir": str(cache), "path": "/nonexistent"},
            loss=topk_loss,
        ),
    ]
    by = {r["name"]: r for r in results}
    summary = {
        "device": args.device,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "topk": k,
        "student_params": sizes["student"],
        "teacher_params": sizes["teacher"],
        "student": args.student,
        "teacher": args.teacher,
        "teacher_to_student": round(sizes["teacher"] / sizes["student"], 2),
        "completion_tokens_cached": manifest["counts"]["completion_tokens"],
        "cache_write_s": round(cache_s, 2),
        "cache_bytes_per_token": manifest["bytes"]["per_completion_token"],
        "cache_arrays_bytes_per_token": manifest["bytes"]["arrays_per_completion_token"],
        "dense_float32_bytes_per_token": manifest["bytes"]["dense_float32_per_token"],
        "speedup_vs_live_topk": round(by["live_topk"]["step_s"] / by["cached"]["step_s"], 2),
        "speedup_vs_live_full": round(by["live_full"]["step_s"] / by["cached"]["step_s"], 2),
        "speedup_vs_live_topk_best": round(
            by["live_topk"]["step_best_s"] / by["cached"]["step_best_s"], 2
        ),
        "step1_loss_rel_diff": abs(by["cached"]["first_loss"] - by["live_topk"]["first_loss"])
        / abs(by["live_topk"]["first_loss"]),
        "runs": results,
    }
    print(f"{'run':<10} {'s/step':>8} {'best':>8} {'teacher s':>10} {'loss@1':>9} {'loss@end':>9}")
    for r in results:
        print(
            f"{r['name']:<10} {r['step_s']:8.4f} {r['step_best_s']:8.4f} "
            f"{r['teacher_score_s']:10.4f} "
            f"{r['first_loss']:9.4f} {r['last_loss']:9.4f}"
        )
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if summary["teacher_to_student"] < 4:
        print("note: the teacher is less than 4x the student")
    if summary["step1_loss_rel_diff"] > 1e-3:
        raise SystemExit("cached and live top-k losses differ at step 1: the cache is misaligned")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
