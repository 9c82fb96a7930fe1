"""Sparse top-k KD from the offline cache vs full-vocabulary KD with the live teacher, demo task.

    python benchmarks/topk_vs_full.py --quick          # demo's quick models, 150 steps
    python benchmarks/topk_vs_full.py --steps 400 --ks 64 16 4

Both start from the demo's weak student (`opd.cli.demo.build.build_models`) and train for the
same steps on the same ground-truth batches (supervised KD, forward KL):

  full       teacher.kind=local, loss.estimator=full (the `supervised_kd` preset)
  topk<k>    teacher.kind=cached with `opd score --topk 64` written once; loss.estimator=topk,
             loss.topk=k (k <= 64 reads a prefix of the same cache)

Reported per run: the training loss at the end; the full-vocabulary forward KL(T||S) per
token on held-out eval completions (teacher forcing; the same yardstick for every run,
unlike the training losses, which for top-k are over k+1 buckets); and greedy exact-match
accuracy on the eval split. The script fails when top-k with k=64 is further from full
KD than the stated margins (--max-kl-gap nats/token, --max-acc-gap absolute accuracy).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from opd.cli.demo.build import build_models, greedy_accuracy
from opd.cli.demo.task import make_examples
from opd.config.parse import DataConfig, config_from_dict
from opd.data.batch import assemble
from opd.data.rows import Encoder
from opd.losses import token_divergence
from opd.modeling.hf import completion_logits, load_causal_lm, load_tokenizer
from opd.run.checkpoint import latest_checkpoint
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.teachers.cache.generate import CacheSpec, build_cache


@torch.no_grad()
def eval_forward_kl(student_dir, teacher, tok, rows, batch_size: int = 64) -> float:
    """Full-vocabulary KL(T||S) per completion token on ground-truth eval completions."""
    student = load_causal_lm(str(student_dir)).eval()
    enc = Encoder(tok, DataConfig())
    total, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = assemble(
            [enc.prompt_ids(r["prompt"]) for r in chunk],
            [enc.completion_ids(r["completion"]) for r in chunk],
            pad_id=tok.pad_token_id,
        )
        s = completion_logits(student, batch, len(tok))
        t = completion_logits(teacher, batch, len(tok))
        mask = batch.loss_mask()
        total += float(token_divergence(s, t, "forward_kl")[mask].sum())
        tokens += int(mask.sum())
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo's quick models")
    parser.add_argument("--steps", type=int, default=0, help="default 150 quick, 400 full")
    parser.add_argument("--ks", type=int, nargs="+", default=[64, 8])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4, help="as opd.cli.demo.run")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps, as opd.cli.demo.run")
    parser.add_argument("--num-train", type=int, default=4096)
    parser.add_argument("--num-eval", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="~/.cache/opd/cli/demo", help="demo model cache")
    parser.add_argument("--max-kl-gap", type=float, default=0.02, help="nats/token, k=64")
    parser.add_argument("--max-acc-gap", type=float, default=0.05, help="accuracy, k=64")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    steps = args.steps or (150 if args.quick else 400)
    if max(args.ks) > 64:
        raise SystemExit("--ks must be <= 64 (the cache stores top-64)")

    t0 = time.perf_counter()
    paths = build_models(args.cache_dir, quick=args.quick, seed=args.seed)
    build_s = time.perf_counter() - t0
    teacher_dir, student_dir = paths["teacher_dir"], paths["student_dir"]
    root = Path(tempfile.mkdtemp(prefix="opd-bench-topk-"))
    train_rows = make_examples(args.num_train, args.seed, "train")
    eval_rows = make_examples(args.num_eval, args.seed, "eval")
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        with (root / f"{name}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    t0 = time.perf_counter()
    cache = root / "cache"
    manifest = build_cache(
        str(teacher_dir),
        root / "train.jsonl",
        cache,
        CacheSpec(mode="score", topk=64),
        batch_size=64,
    )
    cache_s = time.perf_counter() - t0

    base = {
        "student": {"path": str(student_dir)},
        "data": {"train": str(cache), "eval": str(root / "eval.jsonl")},
        "steps": steps,
        "batch_size": args.batch_size,
        "micro_batch_size": args.batch_size,
        "optim": {"lr": args.lr, "warmup_steps": args.warmup},
        "seed": args.seed,
        "eval_every": steps,
        "eval_size": args.num_eval,
        "eval_metric": "opd.cli.demo.task:exact_match",
        "sampling": {"max_new_tokens": 80},
        "log_every": 10,
    }
    runs = {"full": {"teacher": {"path": str(teacher_dir)}, "preset": "supervised_kd"}}
    for k in args.ks:
        runs[f"topk{k}"] = {
            "teacher": {"kind": "cached", "cache_dir": str(cache)},
            "loss": {"objective": "kd", "divergence": "forward_kl", "estimator": "topk", "topk": k},
        }
    tok = load_tokenizer(str(teacher_dir))
    teacher = load_causal_lm(str(teacher_dir)).eval()
    student0_kl = eval_forward_kl(student_dir, teacher, tok, eval_rows)
    student0_acc = greedy_accuracy(load_causal_lm(str(student_dir)), tok, eval_rows, 80)
    results = {}
    for name, over in runs.items():
        config = config_from_dict({**base, **over, "output_dir": str(root / name)})
        t0 = time.perf_counter()
        last = train(config)
        seconds = time.perf_counter() - t0
        records = [r for r in read_metrics(config.output_dir) if "loss" in r]
        ckpt = latest_checkpoint(config.output_dir)
        results[name] = {
            "train_loss_end": sum(r["loss"] for r in records[-3:]) / len(records[-3:]),
            "eval_forward_kl": eval_forward_kl(ckpt, teacher, tok, eval_rows),
            "eval_accuracy": last.get("eval_accuracy"),
            "seconds": round(seconds, 1),
        }
    gap_kl = (
        results["topk64"]["eval_forward_kl"] - results["full"]["eval_forward_kl"]
        if "topk64" in results
        else None
    )
    gap_acc = (
        results["full"]["eval_accuracy"] - results["topk64"]["eval_accuracy"]
        if "topk64" in results
        else None
    )
    summary = {
        "steps": steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "demo_meta": {k: paths["meta"][k] for k in ("teacher", "student", "config_hash")},
        "demo_build_s": round(build_s, 1),
        "cache_write_s": round(cache_s, 1),
        "cache_bytes_per_token": manifest["bytes"]["per_completion_token"],
        "vocab": manifest["tokenizer"]["vocab_size"],
        "student_before": {"eval_forward_kl": student0_kl, "eval_accuracy": student0_acc},
        "runs": results,
        "topk64_kl_gap": gap_kl,
        "topk64_acc_gap": gap_acc,
    }
    print(f"{'run':<8} {'train loss':>10} {'eval KL(T||S)':>14} {'eval acc':>9} {'seconds':>8}")
    print(f"{'before':<8} {'':>10} {student0_kl:14.4f} {student0_acc:9.3f}")
    for name, r in results.items():
        print(
            f"{name:<8} {r['train_loss_end']:10.4f} {r['eval_forward_kl']:14.4f} "
            f"{r['eval_accuracy']:9.3f} {r['seconds']:8.1f}"
        )
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    if gap_kl is not None and (gap_kl > args.max_kl_gap or gap_acc > args.max_acc_gap):
        raise SystemExit(
            f"top-64 is outside the stated margins: KL gap {gap_kl:.4f} (max {args.max_kl_gap}), "
            f"accuracy gap {gap_acc:.3f} (max {args.max_acc_gap})"
        )


if __name__ == "__main__":
    main()
