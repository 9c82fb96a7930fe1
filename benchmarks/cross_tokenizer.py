"""On-policy distillation from a teacher with another tokenizer vs the same teacher with the
student's tokenizer, on the demo's task.

    python benchmarks/cross_tokenizer.py                        # builds the demo's quick models
    python benchmarks/cross_tokenizer.py --steps 40 --seeds 0 1 2 --eval-size 256

Two teachers of equal skill by construction: the demo's teacher (the student's character
tokenizer) and the *same weights* behind another tokenizer, in which every character has
another id (a permuted vocabulary, embedding and head rows permuted with it) and the special
tokens have other names (`[EOS]` for `<eos>`). So any difference in the students' gains is
the cross-tokenizer path's: the teacher's batch re-rendered in its tokens, its log-probs
brought back by byte alignment. Both vocabularies cut text into characters, so every span
is one token on each side: this measures the machinery, not the approximation of kd across
multi-token spans (pg, the estimator run here, is exact for any spans).

Runs, each from the same student with the same prompts, seeds and updates:

  same     on_policy (pg), teacher A: the shared-vocabulary path
  cross    on_policy (pg), teacher B (another tokenizer): the alignment path
  forced   on_policy (pg), teacher A forced through alignment (cross_tokenizer.when=always):
           its step time against `same` is the alignment's overhead

Reported per run: greedy exact-match accuracy on the eval split before and after, the gain,
time per step and its teacher-scoring share; then the gain ratio cross / same (goal >= 0.9)
with mean and spread over seeds, and the overhead (goal <= 10% of step time): measured
directly as the median time of one step batch's alignment work (teacher batch built, scores
mapped back; no forward) over the `same` run's step time, and end to end as the `forced`
run's step time against `same` (noisy on a shared machine).

TRL's GOLD trainer is not run by this script (the report records whether
`trl.experimental.gold` imports at all; it did not in the environment the figures in
`benchmarks/README.md` come from, where TRL is not installed).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from opd.cli.demo.build import BuildConfig, build_models
from opd.cli.demo.task import make_examples
from opd.config.parse import config_from_dict
from opd.modeling.hf import load_tokenizer
from opd.run.loop import train
from opd.run.metrics import read_metrics

RENAMED = {"<pad>": "[PAD]", "<eos>": "[EOS]", "<unk>": "[UNK]"}


def permuted_teacher(teacher_dir: Path, out: Path, seed: int = 0) -> Path:
    """Teacher A's weights behind a tokenizer with other ids and other special names."""
    tok = load_tokenizer(str(teacher_dir))
    vocab = tok.get_vocab()
    old_ids = sorted(vocab.values())
    new_ids = old_ids[:]
    random.Random(seed).shuffle(new_ids)
    remap = dict(zip(old_ids, new_ids, strict=True))  # old id -> new id
    by_id = {i: t for t, i in vocab.items()}
    new_vocab = {RENAMED.get(by_id[o], by_id[o]): remap[o] for o in old_ids}
    core = Tokenizer(models.WordLevel(vocab=new_vocab, unk_token=RENAMED.get(tok.unk_token)))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    new_tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=RENAMED[tok.pad_token],
        eos_token=RENAMED[tok.eos_token],
        unk_token=RENAMED[tok.unk_token],
    )
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    order = torch.tensor([o for o, _ in sorted(remap.items(), key=lambda kv: kv[1])])
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb[order].clone())
        head = model.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():
            head.copy_(head[order].clone())
    model.config.pad_token_id = new_tok.pad_token_id
    model.config.eos_token_id = new_tok.eos_token_id
    model.save_pretrained(out)
    new_tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(name: str, common: dict, teacher: Path, out: Path, seed: int, forced=False) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    data = {**common, "seed": seed, "output_dir": str(run_dir)}
    data["teacher"] = {"path": str(teacher)}
    data["cross_tokenizer"] = {"when": "always" if forced else "auto"}
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
        out_["aligned_frac"] = statistics.mean(r["xtok_aligned_frac"] for r in steps)
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


def gold_available() -> str:
    try:
        import trl.experimental.gold  # noqa: F401
    except Exception as err:  # not installed, or an older TRL
        return f"not run: {type(err).__name__}: {err}"
    return "importable, not run by this script"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "opd" / "demo"))
    parser.add_argument("--out", default="runs/cross_tokenizer")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models_ = build_models(args.cache_dir, seed=0, config=BuildConfig.preset(quick=True))
    teacher_a = Path(models_["teacher_dir"])
    teacher_b = permuted_teacher(teacher_a, out / "teacher-other-tokenizer")
    write_jsonl(out / "train.jsonl", make_examples(args.steps * args.batch_size, 0, "train"))
    write_jsonl(out / "eval.jsonl", make_examples(args.eval_size, 0, "eval"))
    common = {
        "preset": "on_policy",
        "student": {"path": str(models_["student_dir"])},
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
    report = {"args": vars(args), "gold": gold_available(), "runs": {}}
    for seed in args.seeds:
        for name, teacher, forced in (
            ("same", teacher_a, False),
            ("cross", teacher_b, False),
            ("forced", teacher_a, True),
        ):
            result = run(name, common, teacher, out, seed, forced)
            report["runs"][f"{name}/seed{seed}"] = result
            print(json.dumps({"run": name, "seed": seed, **result}), flush=True)
    by = {n: [report["runs"][f"{n}/seed{s}"] for s in args.seeds] for n in ("same", "cross", "forced")}
    ratios = [c["gain"] / s["gain"] for s, c in zip(by["same"], by["cross"]) if s["gain"] > 0]
    overhead = [
        (f["step_s"] - s["step_s"]) / s["step_s"] for s, f in zip(by["same"], by["forced"])
    ]
    align_s = alignment_seconds(
        Path(models_["student_dir"]), teacher_b, make_examples(args.batch_size, 1, "train")
    )
    report["summary"] = {
        "alignment_s_per_step_batch": round(align_s, 5),
        "alignment_share_of_same_step": spread([align_s / r["step_s"] for r in by["same"]]),
        "gain_same": spread([r["gain"] for r in by["same"]]),
        "gain_cross": spread([r["gain"] for r in by["cross"]]),
        "gain_ratio_cross_over_same": spread(ratios) if ratios else "same run gained nothing",
        # end-to-end step time difference: noisy on a shared machine (see README)
        "forced_minus_same_step_time_over_same": spread(overhead),
    }
    print(json.dumps(report["summary"], indent=2))
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
