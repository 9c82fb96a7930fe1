"""On-policy distillation from teachers with another tokenizer vs the same teacher with the
student's tokenizer, on the demo's task; TRL's GOLD on the same pair beside it.

    python benchmarks/cross_tokenizer.py                        # the quick setting, one seed
    python benchmarks/cross_tokenizer.py --setting full --seeds 0 1 2 \
        --runs same permuted merged same_rkl permuted_rkl merged_kd_span gold
    /work/main/.venv/bin/python benchmarks/cross_tokenizer.py   # an environment with TRL: + GOLD

Settings (`--setting`; each value can be overridden by its option):

  quick  the demo's quick recipe (40 updates of 32 prompts, lr 1e-3, 5 warm-up steps) and
         256 eval problems of mixed length, 2 samples each, 72 new tokens
  full   the full `opd demo` recipe: 250 updates of 32, lr 1e-3, 5 warm-up steps, and the
         demo's held-out problems (96 per length at 4, 8, 12, 16 steps, 4 samples each,
         the demo's max new tokens)

The student and teacher A are the demo's (`opd.cli.demo.build`, cached under --cache-dir;
the quick and full presets build the same models). Teachers (`cross_tokenizer_teachers.py`):

  A         the demo's teacher, the student's character tokenizer
  permuted  A's weights behind a permuted character vocabulary with renamed specials:
            equal skill by construction, every span one token on each side (the machinery)
  merged    trained here with A's architecture, build recipe and stopping rule on the demo's
            data, in a tokenizer that writes each step label with its digit as one token
            (`a7`, `#4`): every completion step is a span of two student tokens and one
            teacher token (few one-to-one positions); skill measured, not constructed

Runs, each from the same student with the same prompts, seeds and updates:

  same           on_policy (pg), teacher A: the shared-vocabulary path
  permuted       on_policy (pg), the permuted teacher: the alignment path
  merged         on_policy (pg), the merged teacher: exact span log-probs across real spans,
                 each span's teacher log-prob of its text whatever follows (the default
                 cross_tokenizer.boundary=marginal; `merged_token`, `merged_long_token`
                 with --runs: boundary=token, the teacher's tokens as cut)
  same_rkl       the demo's on_policy_rkl (minillm_like: full-vocabulary reverse KL), A
  permuted_rkl   the same from the permuted teacher (its distribution mapped by token bytes)
  merged_rkl     the same from the merged teacher, cross_tokenizer.span_kd=masked
  merged_rkl_span  the same with span_kd=span (pg's span term inside multi-token spans)
  merged_kd      top-k reverse-KL kd from the merged teacher, cross_tokenizer.span_kd=masked
  merged_kd_span the same with span_kd=span
  merged_long,   (with --runs only) pg and full reverse KL from `merged_long`: the merged
  merged_long_rkl  teacher trained all of the spec's 900 steps (no early stop), where the
                 stopping rule leaves `merged` weaker than A on the demo's long problems
  merged_xl      (with --runs only) pg from `merged_xl`: the merged teacher trained twice the
                 spec's steps, to A_long's skill (measured: both teachers' sampled accuracy
                 is reported); its references are same and same_long
  merged_distilled  (with --runs only) pg from a merged-tokenizer teacher trained (twice the
                 spec's steps) on A_long's own distributions, exact per merged token
                 (`cross_tokenizer_distilled.py`): A_long's text distribution in the merged
                 tokens, so the gain ratio to same_long measures the alignment alone
  same_long      (with --runs only) pg from `A_long`: the same code, steps and seed as
                 `merged_long` in the student's character tokenizer (the teacher's
                 training apart, only the tokenizer differs); merged_long's second reference
  forced         on_policy (pg), teacher A forced through alignment: its step time against
                 `same` is the alignment's overhead
  same_d1,       (with --runs only) same and merged with loss.discount=1: each token's
  merged_d1      advantage is the whole return, so a span's reward reaches all its tokens
  gold           TRL's GOLDTrainer (ULD) from the merged teacher (`cross_tokenizer_gold.py`),
                 when TRL imports: the same prompts, batch, steps, learning rate, on-policy
  gold_hybrid    the same with GOLD's hybrid loss (uld_use_hybrid_loss: JSD on the tokens
                 both vocabularies spell alike, ULD on the rest)
  gold_permuted  the same from the permuted teacher (every position one token a side: ULD's
                 positional pairing is right there; GOLD's best case)

Reported per run (`cross_tokenizer_measure.py`, the demo's probes): sampled (T=1) and greedy
answer accuracy before and after, the gain with its 95% interval over seeds and problems,
time per step; for each cross run its gain's ratio to the matching same-tokenizer run
(`same`, or `same_rkl` for the reverse-KL runs) per seed with a t interval, and the paired
goal test (gain - 0.9 x reference gain); both teachers' accuracy in their own tokenizers;
and the alignment overhead (goal <= 10% of step time), measured directly as the median time
of one step batch's alignment work (teacher batch built, scores mapped back; no forward)
over the `same` run's step time. Runs on one torch thread (`--threads`), as the demo does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import cross_tokenizer_measure as measure
from cross_tokenizer_distilled import distilled_teacher
from cross_tokenizer_teachers import merged_teacher, permuted_teacher

from opd.cli.demo import probes
from opd.cli.demo.build import BuildConfig, build_models
from opd.cli.demo.quiet import quiet_transformers
from opd.cli.demo.task import make_examples
from opd.config.parse import config_from_dict
from opd.config.sections import DataConfig
from opd.data.rows import Encoder
from opd.modeling.hf import load_causal_lm, load_tokenizer
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.setup import build_run

# on-policy top-k kd: the on_policy preset's samples (source.lmbda=1), not its estimator
KD = {
    "preset": None,
    "source": {"lmbda": 1.0},
    "loss": {"objective": "kd", "estimator": "topk", "topk": 16, "divergence": "reverse_kl"},
}
# the demo's on_policy_rkl (`opd.cli.demo.run.METHODS`): full-vocabulary reverse KL
RKL = {"preset": "minillm_like"}
# name -> (teacher key, config overrides)
RUNS = {
    "same": ("A", {}),
    "permuted": ("permuted", {}),
    "merged": ("merged", {}),
    "same_rkl": ("A", RKL),
    "permuted_rkl": ("permuted", RKL),
    "merged_rkl": ("merged", {**RKL, "cross_tokenizer": {"span_kd": "masked"}}),
    "merged_rkl_span": ("merged", {**RKL, "cross_tokenizer": {"span_kd": "span"}}),
    "merged_kd": ("merged", {**KD, "cross_tokenizer": {"span_kd": "masked"}}),
    "merged_kd_span": ("merged", {**KD, "cross_tokenizer": {"span_kd": "span"}}),
    "forced": ("A", {"cross_tokenizer": {"when": "always"}}),
    # not run by default (--runs): pg with the whole return (discount 1) as the advantage
    "same_d1": ("A", {"loss": {"discount": 1.0}}),
    "merged_d1": ("merged", {"loss": {"discount": 1.0}}),
    # the merged teacher trained all of the spec's steps (no early stop): see --runs
    "merged_long": ("merged_long", {}),
    "same_long": ("A_long", {}),
    "merged_long_rkl": ("merged_long", {**RKL, "cross_tokenizer": {"span_kd": "masked"}}),
    # pg with the boundary's "no merge" term left where the teacher's tokens cut it
    # (cross_tokenizer.boundary=token, the rule before 2026-12-06's default `marginal`)
    "merged_token": ("merged", {"cross_tokenizer": {"boundary": "token"}}),
    "merged_long_token": ("merged_long", {"cross_tokenizer": {"boundary": "token"}}),
    # the merged teacher trained twice the spec's steps: as skilled as A_long when sampled
    "merged_xl": ("merged_xl", {}),
    # the same, the marginal read from every teacher token (the top-k is the vocabulary)
    "merged_xl_all": ("merged_xl", {"cross_tokenizer": {"boundary_topk": 1024}}),
    # a merged-tokenizer teacher trained on A_long's distributions (cross_tokenizer_distilled)
    "merged_distilled": ("merged_distilled", {}),
}
DEFAULT_RUNS = ["same", "permuted", "merged", "merged_kd", "merged_kd_span", "forced", "gold"]
# the run whose gain a cross run's gain is a share of
REFERENCE = {n: ["same_rkl" if "rkl" in n else "same"] for n in RUNS if not n.startswith("same")}
REFERENCE["merged_long"].append("same_long")  # the same training code, steps and seed
REFERENCE["merged_long_token"].append("same_long")
REFERENCE["merged_xl"].append("same_long")
REFERENCE["merged_xl_all"].append("same_long")
REFERENCE["merged_distilled"].append("same_long")  # its source
# GOLD run -> (its teacher, GOLD's hybrid loss)
GOLD = {"gold": ("merged", False), "gold_hybrid": ("merged", True), "gold_permuted": ("permuted", False)}
REFERENCE.update({g: ["same"] for g in GOLD})
SETTINGS = {
    "quick": {"steps": 40, "eval_size": 256, "lengths": None, "samples": 2, "max_new_tokens": 72},
    # the demo's full recipe and held-out problems (`opd.cli.demo.run.DemoSettings`)
    "full": {"steps": 250, "eval_size": 96, "lengths": [4, 8, 12, 16], "samples": 4,
             "max_new_tokens": BuildConfig.preset(quick=False).max_new_tokens},
}  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def step_times(records: list[dict]) -> dict:
    """Median seconds per step and per teacher scoring, the first (warm-up) step left out:
    medians, because on the shared box a step now and then stalls for minutes (one of 250
    took 142 s with 0.3 s in its phases, 2026-12-06)."""
    steps = [r for r in records if r.get("step", 0) > 1]
    return {
        "step_s": statistics.median(r["time_step"] for r in steps),
        "teacher_score_s": statistics.median(r.get("time_teacher_score", 0.0) for r in steps),
    }


def run(name: str, common: dict, teacher: Path, out: Path, seed: int, extra: dict, ev) -> dict:
    """Train the student with run `name`; its accuracy after (`ev(model, seed)`) and timings."""
    run_dir = out / f"{name}-seed{seed}"
    data = {**common, "seed": seed, "output_dir": str(run_dir), **extra}
    data = {k: v for k, v in data.items() if v is not None}
    data["teacher"] = {"path": str(teacher)}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    config = config_from_dict(data)
    with quiet_transformers():
        setup = build_run(config)
        train(config, run=setup)
    seconds = time.perf_counter() - t0
    records = read_metrics(run_dir)
    steps = [r for r in records if r.get("step", 0) > 1]
    out_ = {
        "accuracy": ev(setup.student, seed),
        "seconds": round(seconds, 1),
        **step_times(records),
    }
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


def gold_available() -> str | None:
    """None when `trl.experimental.gold` imports, else why not."""
    try:
        import trl.experimental.gold  # noqa: F401
    except Exception as err:  # not installed, or an older TRL
        return f"{type(err).__name__}: {err}"
    return None


def run_gold_seed(
    args, student: Path, teacher: Path, out: Path, seed: int, ev, name="gold", hybrid=False
) -> dict:
    """GOLD from `teacher` with this run's budget; its student measured as ours are."""
    from cross_tokenizer_gold import run_gold

    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    model, _, info = run_gold(
        student, teacher, rows, out / f"{name}-seed{seed}", steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        max_new_tokens=args.max_new_tokens, seed=seed, extended=False, hybrid=hybrid,
    )  # fmt: skip
    return {"accuracy": ev(model, seed), "seconds": info["seconds"],
            "step_s": info["seconds"] / max(args.steps, 1),
            "uld": "positional (use_extended_uld=False)" + (", hybrid" if hybrid else "")}  # fmt: skip


def brief(acc: dict) -> dict:
    return {k: round(measure.mean_of(acc, k), 4) for k in ("sampled", "greedy")}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="quick")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "opd" / "demo"))
    parser.add_argument("--out", default="runs/cross_tokenizer")
    parser.add_argument("--steps", type=int, help="updates (setting's default)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=5, help="linear warm-up steps")
    parser.add_argument("--eval-size", type=int, help="eval problems (per length in full)")
    parser.add_argument("--samples", type=int, help="sampled completions per eval problem")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=[*RUNS, *GOLD])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--summarize-only", action="store_true",
                        help="recompute the summary of --out's results.json (step times from "
                        "the runs' metrics), train nothing")  # fmt: skip
    parser.add_argument("--merge", nargs="*", default=[], metavar="OUT",
                        help="with --summarize-only: add the seeds and runs of these --out "
                        "directories (the same setting) into results-merged.json")  # fmt: skip
    args = parser.parse_args(argv)
    setting = SETTINGS[args.setting]
    for key in ("steps", "eval_size", "samples", "max_new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, setting[key])
    args.lengths = setting["lengths"]
    return args


def summarize(report: dict, args, names: list[str], student: Path, merged: Path) -> dict:
    """Gains, ratios and goal tests over the seeds of `report` (`cross_tokenizer_measure`);
    step times; the alignment overhead."""
    runs = {n: {s: report["runs"][f"{n}/seed{s}"] for s in args.seeds if f"{n}/seed{s}" in report["runs"]}
            for n in names}  # fmt: skip
    summary = measure.summarize(
        report["before"],
        {n: {s: r["accuracy"] for s, r in rs.items()} for n, rs in runs.items()},
        {n: ref for n, ref in REFERENCE.items() if n in runs},
    )
    by = {n: list(rs.values()) for n, rs in runs.items()}
    for n, rs in by.items():
        summary[n]["step_s"] = round(statistics.mean(r["step_s"] for r in rs), 4)
    if "same" in by:
        rows = make_examples(args.batch_size, 1, "train")
        align_s = alignment_seconds(student, merged, rows)
        summary["alignment_s_per_step_batch_merged"] = round(align_s, 5)
        shares = [align_s / r["step_s"] for r in by["same"]]
        summary["alignment_share_of_same_step"] = measure._fmt(measure.t_interval(shares))
    if "forced" in by and "same" in by:
        summary["forced_minus_same_step_time_over_same"] = measure._fmt(measure.t_interval(
            [(f["step_s"] - s["step_s"]) / s["step_s"] for s, f in zip(by["same"], by["forced"])]
        ))  # fmt: skip
    return summary


def resummarize(args) -> int:
    """The summary of a finished (or partial) results.json again: step times as medians
    read from each run's metrics, everything else as stored."""
    out = Path(args.out)
    report = json.loads((out / "results.json").read_text())
    report["before"] = {int(k): _int_keys(v) for k, v in report["before"].items()}
    for other in args.merge:  # more seeds or runs of the same setting, run apart
        more = json.loads((Path(other) / "results.json").read_text())
        differ = {k for k in ("setting", "steps", "eval_size", "samples", "lr", "max_new_tokens")
                  if more["args"][k] != report["args"][k]}  # fmt: skip
        if differ:
            raise SystemExit(f"--merge {other}: another setting ({', '.join(sorted(differ))})")
        report["before"].update({int(k): _int_keys(v) for k, v in more["before"].items()})
        report["runs"].update({k: {**v, "out": other} for k, v in more["runs"].items()})
        report["args"]["seeds"] = sorted({*report["args"]["seeds"], *more["args"]["seeds"]})
    for key, result in report["runs"].items():
        result["accuracy"] = _int_keys(result["accuracy"])
        name, seed = key.split("/seed")
        metrics = Path(result.get("out", out)) / f"{name}-seed{seed}"
        if (metrics / "metrics.jsonl").is_file():
            result.update(step_times(read_metrics(metrics)))
    stored = argparse.Namespace(**report["args"])
    names = list(dict.fromkeys(k.split("/seed")[0] for k in report["runs"]))
    models_ = build_models(stored.cache_dir, seed=0, config=BuildConfig.preset(quick=stored.setting == "quick"))
    report["summary"] = summarize(report, stored, names, Path(models_["student_dir"]), out / "teacher-merged")
    print(json.dumps(report["summary"], indent=2))
    name = "results-merged.json" if args.merge else "results.json"
    (out / name).write_text(json.dumps(report, indent=2))
    print(f"wrote {out / name}")
    return 0


def _int_keys(d: dict) -> dict:
    return {int(k): v for k, v in d.items()}


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.summarize_only:
        return resummarize(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build = BuildConfig.preset(quick=args.setting == "quick")
    models_ = build_models(args.cache_dir, seed=0, config=build)
    student = Path(models_["student_dir"])
    teachers = {"A": Path(models_["teacher_dir"])}
    teachers["permuted"] = permuted_teacher(teachers["A"], out / "teacher-permuted")
    teachers["merged"], merged_meta = merged_teacher(out / "teacher-merged", build, seed=0)
    metas = {"A": models_["meta"]["teacher"]["eval_accuracy"], "merged": merged_meta}
    if any(RUNS.get(n, ("",))[0] == "merged_long" for n in args.runs):
        teachers["merged_long"], metas["merged_long"] = merged_teacher(
            out / "teacher-merged-long", build, seed=0, stop=False
        )
    if any(RUNS.get(n, ("",))[0] == "merged_xl" for n in args.runs):
        teachers["merged_xl"], metas["merged_xl"] = merged_teacher(
            out / "teacher-merged-xl", build, seed=0, stop=False, steps=2 * build.teacher.steps
        )
    distilled = any(RUNS.get(n, ("",))[0] == "merged_distilled" for n in args.runs)
    if distilled or any(RUNS.get(n, ("",))[0] == "A_long" for n in args.runs):
        teachers["A_long"], metas["A_long"] = merged_teacher(
            out / "teacher-A-long", build, seed=0, stop=False, tokenizer=load_tokenizer(str(student))
        )
    if distilled:
        teachers["merged_distilled"], metas["merged_distilled"] = distilled_teacher(
            out / "teacher-merged-distilled", build, teachers["A_long"], 2 * build.teacher.steps
        )
    write_jsonl(out / "train.jsonl", make_examples(args.steps * args.batch_size, 0, "train"))
    if args.lengths:  # the demo's held-out problems (`opd.cli.demo.run`, seed 0)
        eval_sets = probes.make_eval_sets(build.task, args.lengths, args.eval_size, 0)
    else:  # one set of mixed lengths, keyed 0
        eval_sets = {0: make_examples(args.eval_size, 0, "eval")}
    encoder = Encoder(load_tokenizer(str(student)), DataConfig())

    def ev(model, seed, enc=encoder):
        return measure.accuracy(model, enc, eval_sets, args.samples, seed, args.max_new_tokens)

    common = {
        "preset": "on_policy",
        "student": {"path": str(student)},
        "data": {"train": str(out / "train.jsonl")},
        "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens},
        "optim": {"lr": args.lr, "warmup_steps": args.warmup, "max_grad_norm": 1.0},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "micro_batch_size": args.batch_size,
        "device": args.device,
    }
    with quiet_transformers():
        student0 = load_causal_lm(str(student))
        skill = {
            key: brief(ev(load_causal_lm(str(teachers[key])), 0,
                          Encoder(load_tokenizer(str(teachers[key])), DataConfig())))
            for key in metas
        }  # fmt: skip
    gold_missing = gold_available() if set(GOLD) & set(args.runs) else "not asked for"
    report = {
        "args": vars(args),
        "teachers": {key: {"build": meta, **skill[key]} for key, meta in metas.items()},
        "gold": gold_missing or "run",
        "before": {},
        "runs": {},
    }  # fmt: skip
    print(json.dumps({"teachers": report["teachers"]}), flush=True)
    names = [n for n in args.runs if n not in GOLD or gold_missing is None]
    for seed in args.seeds:
        report["before"][seed] = ev(student0, seed)
        print(json.dumps({"before": seed, **brief(report["before"][seed])}), flush=True)
        for name in names:
            if name in GOLD:
                key, hybrid = GOLD[name]
                result = run_gold_seed(args, student, teachers[key], out, seed, ev, name, hybrid)
            else:
                key, extra = RUNS[name]
                result = run(name, common, teachers[key], out, seed, extra, ev)
            report["runs"][f"{name}/seed{seed}"] = result
            (out / "results.json").write_text(json.dumps(report, indent=2))  # so far
            shown = {k: v for k, v in result.items() if k != "accuracy"}
            print(json.dumps({"run": name, "seed": seed, **brief(result["accuracy"]), **shown}), flush=True)
    report["summary"] = summarize(report, args, names, student, teachers["merged"])
    print(json.dumps(report["summary"], indent=2))
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
