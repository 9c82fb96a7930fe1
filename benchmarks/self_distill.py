"""Self-distillation with the reference in the teacher's context vs SFT on the references.

    python benchmarks/self_distill.py                      # builds the demo's quick models
    python benchmarks/self_distill.py --models ~/.cache/opd/demo/models-<hash> --seeds 0 1 2
    python benchmarks/self_distill.py --methods opsd_frozen --template "{prompt}"  # control

With the models built, one seed of all five methods takes about 2 minutes on 2 CPU cores.

Every method starts from the demo's weak student (`opd.cli.demo.build.build_models`, no bigger
teacher involved unless named) and makes the same number of optimizer updates on the same
prompts (`--steps` x `--batch-size`):

  sft           cross-entropy on the reference completions (the dataset's worked solutions)
  opsd_frozen   teacher.kind=self, frozen starting weights, full-vocabulary JSD(0.5) on
                student samples; the teacher's prompt carries the reference solution
  opsd_ema      the same with EMA teacher weights (teacher.ema_decay)
  sdft_live     teacher.kind=self, current weights, per-token reverse KL (SDFT-style)
  rl_kd         RL + on-policy distillation with the demo's (bigger) teacher: reward
                exact match, GKD alpha = reward.distill_weight, reverse KL, n samples/prompt

Reported: greedy exact-match accuracy on the eval split before and after, the self
teacher's own greedy accuracy with the reference in its prompt (the ceiling a privileged
self-teacher offers), and for rl_kd the per-step reward mean and both weighted loss terms.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from opd.cli.demo.build import BuildConfig, ModelSpec, build_models
from opd.cli.demo.task import exact_match, make_examples
from opd.config.parse import DataConfig, config_from_dict
from opd.data.batch import assemble
from opd.data.rows import Encoder
from opd.evaluation.generation import task_accuracy
from opd.modeling.hf import completion_logits, load_causal_lm, load_tokenizer, token_logprobs
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.teachers.self_teacher import render_privileged

# The reference solution, then the question again: the teacher sees the worked answer
# before it is asked, the student only the question.
TEMPLATE = "reference: {completion}\n{prompt}"

METHODS: dict[str, dict] = {
    "sft": {"loss": {"objective": "ce"}, "source": {"lmbda": 0.0, "off_policy": "dataset"}},
    "opsd_frozen": {"preset": "opsd", "teacher": {"self_weights": "frozen"}},
    "opsd_ema": {"preset": "opsd", "teacher": {"self_weights": "ema", "ema_decay": 0.9}},
    "sdft_live": {"preset": "sdft", "teacher": {"self_weights": "live"}},
    "rl_kd": {
        "preset": "minillm_like",
        "reward": {"function": "opd.cli.demo.task:exact_match", "distill_weight": 0.5},
        "sampling": {"n": 4},
    },
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def greedy(model, encoder, rows, max_new_tokens: int, vocab: int, prompt_field="prompt") -> float:
    return task_accuracy(
        model,
        encoder,
        rows,
        exact_match,
        prompt_field=prompt_field,
        max_new_tokens=max_new_tokens,
        vocab_size=vocab,
    )


@torch.no_grad()
def privileged_diagnostics(
    student_dir: str, eval_rows: list[dict], max_new_tokens: int, template: str = TEMPLATE
) -> dict:
    """What the privileged context gives the starting student: greedy accuracy with the
    reference in its prompt, and the reference's NLL per token with and without it."""
    tok = load_tokenizer(student_dir)
    enc = Encoder(tok, DataConfig(chat_template="off"))
    rows = [{**r, "privileged": render_privileged(template, r)} for r in eval_rows]
    model = load_causal_lm(student_dir).eval()
    out = {
        "self_teacher_accuracy_with_reference": greedy(
            model, enc, rows, max_new_tokens, len(tok), prompt_field="privileged"
        )
    }
    for name, field in (("plain", "prompt"), ("with_reference", "privileged")):
        batch = assemble(
            [enc.prompt_ids(r[field]) for r in rows],
            [enc.completion_ids(r["completion"]) for r in rows],
            pad_id=tok.pad_token_id,
        )
        lp = token_logprobs(completion_logits(model, batch, len(tok)), batch.completion_ids())
        mask = batch.loss_mask()
        out[f"reference_nll_{name}"] = float(-(lp * mask).sum() / mask.sum())
    return out


def run_method(name: str, common: dict, out: Path, seed: int) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    data = {**common, **METHODS[name], "seed": seed, "output_dir": str(run_dir)}
    data["teacher"] = {**common["teacher"], **METHODS[name].get("teacher", {})}
    data["sampling"] = {**common["sampling"], **METHODS[name].get("sampling", {})}
    # Equal student samples per update for every method: n samples of batch_size / n prompts.
    data["batch_size"] = data["micro_batch_size"] = max(
        1, common["batch_size"] // data["sampling"].get("n", 1)
    )
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    train(config_from_dict(data))
    seconds = time.perf_counter() - t0
    records = read_metrics(run_dir)
    evals = [r for r in records if "eval_accuracy" in r]
    result = {
        "accuracy_before": evals[0]["eval_accuracy"],
        "accuracy_after": evals[-1]["eval_accuracy"],
        "seconds": round(seconds, 1),
        "final_loss": records[-1]["loss"],
    }
    if "reward_mean" in records[-1]:
        steps = [r for r in records if r.get("step", 0) > 0]
        k = max(1, len(steps) // 4)
        for part, rs in (("first", steps[:k]), ("last", steps[-k:])):
            for key in ("reward_mean", "reward_term", "distill_term", "divergence"):
                result[f"{key}_{part}{k}"] = sum(r[key] for r in rs) / len(rs)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "opd" / "demo"))
    parser.add_argument("--full-models", action="store_true", help="the demo's full build")
    parser.add_argument(
        "--models", help="an existing build folder (student/, teacher/, meta.json) to use as is"
    )
    parser.add_argument("--out", default="runs/self_distill")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--template", default=TEMPLATE, help="teacher.privileged_template")
    parser.add_argument("--device", default="auto", help="training device (auto: cuda if any)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.models:
        folder = Path(args.models)
        meta = json.loads((folder / "meta.json").read_text())
        models = {
            "student_dir": folder / "student",
            "teacher_dir": folder / "teacher",
            "meta": meta,
        }
    else:
        build = BuildConfig.preset(quick=not args.full_models)
        if "rl_kd" not in args.methods:
            # Only rl_kd uses the demo's teacher. The student's build does not depend on the
            # teacher's (own seed, same data), so a 1-step stand-in teacher gives the same student.
            stand_in = ModelSpec(hidden=16, layers=1, heads=1, steps=1, lr=1e-3)
            build = replace(build, teacher=stand_in)
        models = build_models(args.cache_dir, seed=0, config=build)
    train_rows = make_examples(args.steps * args.batch_size, 0, "train")
    eval_rows = make_examples(args.eval_size, 0, "eval")
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "eval.jsonl", eval_rows)
    common = {
        "student": {"path": str(models["student_dir"])},
        "teacher": {"path": str(models["teacher_dir"]), "privileged_template": args.template},
        "data": {"train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl")},
        "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens},
        "optim": {"lr": args.lr, "max_grad_norm": 1.0},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "micro_batch_size": args.batch_size,
        "eval_every": args.steps,
        "eval_size": args.eval_size,
        "eval_metric": "opd.cli.demo.task:exact_match",
        "device": args.device,
    }
    report = {
        "args": vars(args),
        "build": {k: models["meta"].get(k) for k in ("config_hash", "config")},
        "template": args.template,
        **privileged_diagnostics(
            str(models["student_dir"]), eval_rows, args.max_new_tokens, args.template
        ),
        "student_build_accuracy": models["meta"]["student"]["eval_accuracy"],
        "demo_teacher_accuracy": models["meta"]["teacher"]["eval_accuracy"],
        "runs": {},
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    for seed in args.seeds:
        for name in args.methods:
            result = run_method(name, common, out, seed)
            report["runs"][f"{name}/seed{seed}"] = result
            print(json.dumps({"method": name, "seed": seed, **result}), flush=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
