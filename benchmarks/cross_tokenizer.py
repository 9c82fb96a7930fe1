"""On-policy distillation from teachers with another tokenizer vs the same teacher with the
student's tokenizer, on the demo's task; TRL's GOLD on the same pair beside it.

    python benchmarks/cross_tokenizer.py                        # builds the demo's quick models
    python benchmarks/cross_tokenizer.py --steps 40 --seeds 0 1 2 --eval-size 256
    /work/main/.venv/bin/python benchmarks/cross_tokenizer.py   # an environment with TRL: + GOLD

Teachers (`cross_tokenizer_teachers.py`):

  A         the demo's teacher, the student's character tokenizer
  permuted  A's weights behind a permuted character vocabulary with renamed specials:
            equal skill by construction, every span one token on each side (the machinery)
  merged    trained here with A's architecture, recipe and stopping rule on the demo's data,
            in a tokenizer that writes each step label with its digit as one token (`a7`,
            `#4`): every completion step is a span of two student tokens and one teacher
            token (few one-to-one positions); skill measured, not constructed

Runs, each from the same student with the same prompts, seeds and updates:

  same           on_policy (pg), teacher A: the shared-vocabulary path
  permuted       on_policy (pg), the permuted teacher: the alignment path
  merged         on_policy (pg), the merged teacher: exact span log-probs across real spans
  merged_kd      top-k reverse-KL kd from the merged teacher, cross_tokenizer.span_kd=masked
  merged_kd_span the same with span_kd=span (pg's span term inside multi-token spans)
  forced         on_policy (pg), teacher A forced through alignment: its step time against
                 `same` is the alignment's overhead
  same_d1,       (with --runs only) same and merged with loss.discount=1: each token's
  merged_d1      advantage is the whole return, so a span's reward reaches all its tokens
  gold           TRL's GOLDTrainer (ULD) from the merged teacher (`cross_tokenizer_gold.py`),
                 when TRL imports: the same prompts, batch, steps, learning rate, on-policy

Reported per run: greedy exact-match accuracy on the eval split before and after, the gain,
time per step; then, over seeds, each run's gain and its ratio to `same` (goal >= 0.9 for
the cross runs) as mean ± sd, and the alignment overhead (goal <= 10% of step time),
measured directly as the median time of one step batch's alignment work (teacher batch
built, scores mapped back; no forward) over the `same` run's step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cross_tokenizer_teachers import merged_teacher, permuted_teacher

from opd.cli.demo.build import BuildConfig, build_models
from opd.cli.demo.task import make_examples
from opd.config.parse import config_from_dict
from opd.modeling.hf import load_tokenizer
from opd.run.loop import train
from opd.run.metrics import read_metrics

# on-policy top-k kd: the on_policy preset's samples (source.lmbda=1), not its estimator
KD = {
    "preset": None,
    "source": {"lmbda": 1.0},
    "loss": {"objective": "kd", "estimator": "topk", "topk": 16, "divergence": "reverse_kl"},
}
# name -> (teacher key, config overrides)
RUNS = {
    "same": ("A", {}),
    "permuted": ("permuted", {}),
    "merged": ("merged", {}),
    "merged_kd": ("merged", {**KD, "cross_tokenizer": {"span_kd": "masked"}}),
    "merged_kd_span": ("merged", {**KD, "cross_tokenizer": {"span_kd": "span"}}),
    "forced": ("A", {"cross_tokenizer": {"when": "always"}}),
    # not run by default (--runs): pg with the whole return (discount 1) as the advantage,
    # so a span's reward reaches every earlier token, not only the span's last one
    "same_d1": ("A", {"loss": {"discount": 1.0}}),
    "merged_d1": ("merged", {"loss": {"discount": 1.0}}),
}
DEFAULT_RUNS = ["same", "permuted", "merged", "merged_kd", "merged_kd_span", "forced", "gold"]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(name: str, common: dict, teacher: Path, out: Path, seed: int, extra: dict) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    data = {**common, "seed": seed, "output_dir": str(run_dir), **extra}
    data = {k: v for k, v in data.items() if v is not None}
    data["teacher"] = {"path": str(teacher)}
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    train(config_from_dict(data))
    seconds = time.perf_counter() - t0
    records = read_metrics(run_dir)
    evals = [r for r in records if "eval_accuracy" in r]
    steps = [r for r in records if r.get("step", 0) > 1]  # the first step warms up
    out_ = {
        "accuracy_before": evals[0]["eval_accuracy"],
        "accuracy_after": evals[-1]["eval_accuracy"],
        "seconds": round(seconds, 1),
        "step_s": statistics.mean(r["time_step"] for r in steps),
        "teacher_score_s": statistics.mean(r.get("time_teacher_score", 0.0) for r in steps),
    }
    out_["gain"] = out_["accuracy_after"] - out_["accuracy_before"]
    if "xtok_aligned_frac" in records[-1]:
        for key in ("aligned_frac", "one_to_one_frac", "mean_span_len"):
            out_[key] = round(statistics.mean(r[f"xtok_{key}"] for r in steps), 4)
        out_["rows_masked"] = sum(r["xtok_rows_masked"] for r in steps)
    return out_


def alignment_seconds(student_dir: Path, teacher_dir: Path, rows: list[dict], repeats=20):
    """Median seconds of the alignment work of one step's batch (the teacher's batch built:
    prompts re-rendered, completions aligned; scores mapped back), the teacher's forward
    excluded: what the cross-tokenizer path adds to a step, measured directly."""
    from opd.config.sections import DataConfig
    from opd.data.batch import assemble
    from opd.data.encoding import Encoder
    from opd.teachers.base import TeacherScores
    from opd.teachers.cross_tokenizer.grid import student_grid_scores
    from opd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher

    s_tok, t_tok = load_tokenizer(str(student_dir)), load_tokenizer(str(teacher_dir))
    s_enc, t_enc = Encoder(s_tok, DataConfig()), Encoder(t_tok, DataConfig())
    cross = CrossTokenizerTeacher(
        None, student_tokenizer=s_tok, teacher_tokenizer=t_tok,
        student_encoder=s_enc, teacher_encoder=t_enc,
    )  # fmt: skip
    batch = assemble(
        [s_enc.prompt_ids(r["prompt"]) for r in rows],
        [s_enc.completion_ids(r["completion"]) for r in rows],
        pad_id=s_tok.pad_token_id,
        source="student",
        rows=rows,
    )
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tbatch, aligned = cross.teacher_batch(batch)
        lp = torch.zeros(tbatch.input_ids.shape[0], tbatch.completion_width)
        student_grid_scores(aligned, batch.completion_width, TeacherScores(token_logprobs=lp),
                            "token", cross.vocab)  # fmt: skip
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f} (n={len(values)})"


def gold_available() -> str | None:
    """None when `trl.experimental.gold` imports, else why not."""
    try:
        import trl.experimental.gold  # noqa: F401
    except Exception as err:  # not installed, or an older TRL
        return f"{type(err).__name__}: {err}"
    return None


def run_gold_seed(args, student: Path, teacher: Path, out: Path, seed: int, eval_rows) -> dict:
    """GOLD from `teacher` with this run's budget; accuracies by the demo's greedy decoding
    (`greedy_accuracy`), the same greedy exact match opd's eval reports."""
    from cross_tokenizer_gold import run_gold
    from transformers import AutoModelForCausalLM

    from opd.cli.demo.pretrain import greedy_accuracy

    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    max_new = args.max_new_tokens
    initial = AutoModelForCausalLM.from_pretrained(student).eval()
    before = greedy_accuracy(initial, load_tokenizer(str(student)), eval_rows, max_new)
    model, tok, info = run_gold(
        student, teacher, rows, out / f"gold-seed{seed}", steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, max_new_tokens=max_new,
        seed=seed, extended=False,
    )  # fmt: skip
    after = greedy_accuracy(model, tok, eval_rows, max_new)
    steps = max(args.steps, 1)
    return {"accuracy_before": before, "accuracy_after": after, "gain": after - before,
            "seconds": info["seconds"], "step_s": info["seconds"] / steps,
            "uld": "positional (use_extended_uld=False)"}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "opd" / "demo"))
    parser.add_argument("--out", default="runs/cross_tokenizer")
    parser.add_argument("--steps", type=int, default=40)  # the demo's quick recipe
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=5, help="linear warm-up steps")
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=[*RUNS, "gold"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models_ = build_models(args.cache_dir, seed=0, config=BuildConfig.preset(quick=True))
    student = Path(models_["student_dir"])
    teachers = {"A": Path(models_["teacher_dir"])}
    teachers["permuted"] = permuted_teacher(teachers["A"], out / "teacher-permuted")
    teachers["merged"], merged_meta = merged_teacher(out / "teacher-merged", seed=0)
    write_jsonl(out / "train.jsonl", make_examples(args.steps * args.batch_size, 0, "train"))
    eval_rows = make_examples(args.eval_size, 0, "eval")
    write_jsonl(out / "eval.jsonl", eval_rows)
    common = {
        "preset": "on_policy",
        "student": {"path": str(student)},
        "data": {"train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl")},
        "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens},
        "optim": {"lr": args.lr, "warmup_steps": args.warmup, "max_grad_norm": 1.0},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "micro_batch_size": args.batch_size,
        "eval_every": args.steps,
        "eval_size": args.eval_size,
        "eval_metric": "opd.cli.demo.task:exact_match",
        "device": args.device,
    }
    gold_missing = gold_available() if "gold" in args.runs else "not asked for"
    report = {
        "args": vars(args),
        "teachers": {"A": models_["meta"]["teacher"]["eval_accuracy"], "merged": merged_meta},
        "gold": gold_missing or "run",
        "runs": {},
    }
    names = [n for n in args.runs if n != "gold" or gold_missing is None]
    for seed in args.seeds:
        for name in names:
            if name == "gold":
                result = run_gold_seed(args, student, teachers["merged"], out, seed, eval_rows)
            else:
                key, extra = RUNS[name]
                result = run(name, common, teachers[key], out, seed, extra)
            report["runs"][f"{name}/seed{seed}"] = result
            print(json.dumps({"run": name, "seed": seed, **result}), flush=True)
    by = {n: [report["runs"][f"{n}/seed{s}"] for s in args.seeds] for n in names}
    summary = {f"gain_{n}": spread([r["gain"] for r in rs]) for n, rs in by.items()}
    if "same" in by:
        for n in names:
            pairs = [(s["gain"], r["gain"]) for s, r in zip(by["same"], by[n]) if s["gain"] > 0]
            if n != "same" and pairs:
                summary[f"gain_ratio_{n}_over_same"] = spread([g / s for s, g in pairs])
        align_s = alignment_seconds(student, teachers["merged"], make_examples(args.batch_size, 1, "train"))
        summary["alignment_s_per_step_batch_merged"] = round(align_s, 5)
        summary["alignment_share_of_same_step"] = spread([align_s / r["step_s"] for r in by["same"]])
    if "forced" in by and "same" in by:
        summary["forced_minus_same_step_time_over_same"] = spread(
            [(f["step_s"] - s["step_s"]) / s["step_s"] for s, f in zip(by["same"], by["forced"])]
        )
    report["summary"] = summary
    print(json.dumps(summary, indent=2))
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
