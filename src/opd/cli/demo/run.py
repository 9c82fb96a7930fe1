"""`opd demo`: offline KD vs on-policy distillation, as a test of the exposure-bias claim.

    opd demo --quick              # about 2 minutes on 2 idle CPU cores, cold; 2 seeds
    opd demo                      # the full comparison, 10 seeds, under 10 minutes cold
    opd demo --seeds 20           # narrower intervals, longer

Phases (each with its progress line): build (or reuse) a tokenizer, a teacher that
corrects slips and a weak student (`opd.cli.demo.build`); write the offline data once with
`opd generate` (the teacher's completions and top-k log-probs, `opd.teachers.cache`); measure
teacher and student before distillation; then, for each training seed, distil the same
starting student with each method through `opd.train` for the same number of updates and
measure the result (`opd.cli.demo.measure`); write `report.md`, `results.json` and plots
(`opd.cli.demo.report`, with the intervals and verdicts of `opd.cli.demo.summary`).

A seed changes the training data order, the student's and the evaluation's samples and
the forced-slip positions; the teacher, the student before distillation, the stored
offline data and the held-out problems are shared by all seeds.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from opd.cli.demo import probes
from opd.cli.demo.build import build_models
from opd.cli.demo.measure import CurveProbe, measure
from opd.cli.demo.quiet import quiet_transformers
from opd.cli.demo.report import write_outputs
from opd.cli.demo.task import TaskSpec, make_examples, max_completion_chars
from opd.config.parse import DataConfig, config_from_dict
from opd.config.paths import make_dir
from opd.data.cache_format import read_manifest
from opd.data.rows import Encoder
from opd.evaluation.divergence import teacher_states
from opd.evaluation.generation import sample_completions
from opd.modeling.hf import load_causal_lm, load_tokenizer
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.setup import build_run
from opd.teachers.cache.generate import CacheSpec, build_cache
from opd.teachers.local import LocalTeacher

# Each method is a preset plus what makes it the method named. The offline ones read the
# same stored teacher data (written once); the on-policy ones sample the student and call
# the live teacher. `offline_rkl` is the control that tells the two mechanisms apart: the
# mode-seeking divergence of `on_policy_rkl` on teacher prefixes.
METHODS: dict[str, dict] = {
    "seqkd": {"preset": "seqkd", "source": {"off_policy": "dataset"}},
    # The store holds the teacher's full distribution (top-k with k = the vocabulary).
    "supervised_kd": {
        "preset": "supervised_kd",
        "teacher": {"kind": "cached"},
        "loss": {"estimator": "topk"},
    },
    "offline_rkl": {
        "preset": "supervised_kd",
        "teacher": {"kind": "cached"},
        "loss": {"estimator": "topk", "divergence": "reverse_kl"},
    },
    "on_policy_rkl": {"preset": "minillm_like"},
    "on_policy": {"preset": "on_policy"},
}
OFFLINE = ("seqkd", "supervised_kd", "offline_rkl")
# What runs by default, and why the other two do not: seeds buy more than methods that
# repeat another's story (`--methods` runs them).
DEFAULT_METHODS = ("supervised_kd", "offline_rkl", "on_policy_rkl")
CUT = {
    "seqkd": "offline like supervised_kd, from the same stored completions with hard labels "
    "only (a weaker signal; in the single-seed runs the weakest offline method)",
    "on_policy": "on-policy like on_policy_rkl, the same reverse KL on the student's own "
    "prefixes estimated from the sampled token only (noisier), and the slowest method "
    "(about 1.5 times on_policy_rkl's training time)",
}


@dataclass(frozen=True)
class DemoSettings:
    steps: int
    batch_size: int
    lr: float
    eval_every: int
    lengths: tuple[int, ...]
    per_length: int  # held-out problems per length
    samples: int  # sampled completions per problem
    curve_size: int  # problems in each evaluation during training
    seeds: int  # training seeds per method
    warmup_steps: int = 5

    @classmethod
    def preset(cls, quick: bool) -> DemoSettings:
        if quick:
            return cls(
                steps=40,
                batch_size=32,
                lr=1e-3,
                eval_every=20,
                lengths=(4, 10, 16),
                per_length=64,
                samples=2,
                curve_size=64,
                seeds=2,
            )
        return cls(
            steps=250,
            batch_size=32,
            lr=1e-3,
            eval_every=25,
            lengths=(4, 8, 12, 16),
            per_length=96,
            samples=4,
            curve_size=128,
            # 5 seeds left the on-policy verdict at the mercy of float rounding: a 1e-7
            # change in the fused loss parts the on-policy runs after ~100 updates, and the
            # 5-seed interval against supervised_kd went from [+0.061, +0.093] to [-0.009,
            # +0.106]; 10 seeds of the same runs: [+0.034, +0.088] (README, `opd demo`).
            seeds=10,
        )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_offline_data(models, data_dir: Path, settings, spec, seed, max_new_tokens, vocab) -> dict:
    """`opd generate` once: the teacher's completions and top-k (= all) log-probs."""
    n = settings.steps * settings.batch_size
    prompts = [{"prompt": r["prompt"]} for r in make_examples(n, seed, "train", spec)]
    _write_jsonl(data_dir / "prompts.jsonl", prompts)
    cache = data_dir / "teacher_cache"
    if cache.exists():
        shutil.rmtree(cache)
    spec = CacheSpec(max_new_tokens=max_new_tokens, topk=vocab, seed=seed, shard_size=n)
    t0 = time.perf_counter()
    with quiet_transformers():
        manifest = build_cache(
            str(models["teacher_dir"]), data_dir / "prompts.jsonl", cache, spec, batch_size=512
        )
    seconds = time.perf_counter() - t0
    tokens = sum(s["completion_tokens"] for s in read_manifest(cache)["shards"])
    return {
        "cache": str(cache),
        "prompts": str(data_dir / "prompts.jsonl"),
        "rows": n,
        "teacher_tokens_generated": tokens,
        "teacher_tokens_scored": tokens,
        "seconds": seconds,
        "complete": manifest["complete"],
    }


def run_demo(*args, **kwargs) -> dict:
    """`_run_demo` on one CPU thread: models this small gain nothing from a second one,
    and on a busy machine two OpenMP threads waiting for each other ran the model build
    several times slower (2.5 CPU-minutes and not done, against 1 minute on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    out_dir: str | Path,
    *,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    methods: list[str] | None = None,
    settings: DemoSettings | None = None,
    log=print,
) -> dict:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    settings = settings or DemoSettings.preset(quick)
    if settings.seeds < 1:
        raise ValueError(f"opd demo --seeds: need at least 1, got {settings.seeds}")
    out = make_dir("--out", out_dir)
    cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "opd" / "demo"
    names = list(methods or DEFAULT_METHODS)
    seeds = [seed + i for i in range(settings.seeds)]
    log(
        f"[opd demo] phase 1/5: teacher and student (cache {cache_dir}, quick={quick}, seed={seed})"
    )
    t0 = time.perf_counter()
    models = build_models(cache_dir, quick=quick, seed=seed)
    build_seconds = time.perf_counter() - t0
    task_spec = models["meta"]["config"]["task"]
    spec = TaskSpec(**task_spec)
    max_new = max_completion_chars(spec) + 1
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    tokenizer = load_tokenizer(str(models["tokenizer_dir"]))
    vocab = len(tokenizer)
    log("[opd demo] phase 2/5: offline data, written once by the teacher (opd generate)")
    offline = write_offline_data(models, data_dir, settings, spec, seed, max_new, vocab)

    eval_sets = probes.make_eval_sets(spec, settings.lengths, settings.per_length, seed)
    per = settings.curve_size // len(settings.lengths)
    curve_sets = probes.make_eval_sets(spec, settings.lengths, per, seed + 1)
    curve_rows = [r for rows in curve_sets.values() for r in rows]  # every length
    common = {
        "student": {"path": str(models["student_dir"])},
        "teacher": {"path": str(models["teacher_dir"])},
        "sampling": {"temperature": 1.0, "max_new_tokens": max_new},
        "optim": {"lr": settings.lr, "warmup_steps": settings.warmup_steps},
        "loss": {"estimator": "full", "topk": vocab},
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "micro_batch_size": settings.batch_size,
        "eval_every": settings.eval_every,
        "log_every": settings.eval_every,  # one progress line per evaluation, not per step
    }
    results: dict = {
        "settings": asdict(settings),
        "seed": seed,
        "seeds": seeds,
        "quick": quick,
        "task": task_spec,
        "build": {"seconds": build_seconds, **models["meta"]},
        "offline_data": offline,
        "cut": {k: v for k, v in CUT.items() if k not in names},
        "references": {},
        "methods": {
            name: {
                "config": METHODS[name],
                "offline": name in OFFLINE,
                "student_updates": settings.steps,
                "runs": [],
            }
            for name in names
        },
    }

    log("[opd demo] phase 3/5: teacher and student before distillation")
    with quiet_transformers():
        teacher_model = load_causal_lm(str(models["teacher_dir"]))
        student0 = load_causal_lm(str(models["student_dir"]))
    teacher = LocalTeacher(teacher_model, vocab)
    encoder = Encoder(tokenizer, DataConfig())  # what every run's encoder is here
    teacher_ref = _teacher_reference(
        teacher_model, teacher, encoder, eval_sets, settings, seed, max_new
    )
    bar = tqdm(total=2, desc="measure before", disable=None, dynamic_ncols=True)
    for name, model in (("teacher", teacher_model), ("student_before", student0)):
        ref = teacher_ref if name == "student_before" else None
        m = measure(model, encoder, teacher, eval_sets, settings, seed, max_new, ref)
        results["references"][name] = {"offline": None, "runs": [m]}
        bar.update(1)
    bar.close()

    log(
        f"[opd demo] phase 4/5: distil with {len(names)} methods x {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}), {settings.steps} updates each"
    )
    for k, run_seed in enumerate(seeds, 1):
        for i, name in enumerate(names, 1):
            log(f"[opd demo] seed {run_seed} ({k}/{len(seeds)}), method {i}/{len(names)}: {name}")
            run = _train_one(name, run_seed, out, offline, common, curve_rows, max_new)
            t_measure = time.perf_counter()
            result = measure(
                run["student"],
                encoder,
                teacher,
                eval_sets,
                settings,
                run_seed,
                max_new,
                teacher_ref,
            )
            result.update(run["record"], measure_seconds=time.perf_counter() - t_measure)
            results["methods"][name]["runs"].append(result)
            top = result["by_length"][max(eval_sets)]["sampled_per_problem"]
            log(
                f"[opd demo] {name}, seed {run_seed}: sampled accuracy at {max(eval_sets)} "
                f"steps {sum(top) / len(top):.3f} ({result['train_seconds']:.0f}s training)"
            )
    log("[opd demo] phase 5/5: report")
    results["total_seconds"] = time.perf_counter() - t_start
    results["cpu_seconds"] = time.process_time() - cpu_start
    plotted = write_outputs(out, results)
    log(
        f"[opd demo] wrote {out / 'report.md'}, {out / 'results.json'}"
        + (
            " and plots"
            if plotted
            else " (no plots: matplotlib is not installed; pip install 'opd[demo]' for them)"
        )
        + f" in {results['total_seconds']:.0f}s"
    )
    return results


def _teacher_reference(teacher_model, teacher, encoder, eval_sets, settings, seed, max_new):
    """The teacher's own samples of the longest problems and its logits on them: the
    teacher-prefix side of every exposure gap (shared by all seeds)."""
    tok = encoder.tokenizer
    longest = eval_sets[max(eval_sets)]
    samples = sample_completions(
        teacher_model,
        encoder,
        [r for r in longest for _ in range(settings.samples)],
        prompt_field="prompt",
        max_new_tokens=max_new,
        vocab_size=len(tok),
        temperature=1.0,
        seed=seed + 7,
        batch_size=512,
    )
    states = teacher_states(teacher, *samples, pad_id=tok.pad_token_id, batch_size=512)
    return {"samples": samples, "states": states}


def _train_one(name, run_seed, out, offline, common, curve_rows, max_new) -> dict:
    """Distil the starting student with method `name` and seed `run_seed` (`opd.train`)."""
    run_dir = out / "runs" / name / f"seed-{run_seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    data = offline["cache"] if name in OFFLINE else offline["prompts"]
    config = config_from_dict(
        _merge(
            common,
            METHODS[name],
            {"data": {"train": data}, "output_dir": str(run_dir), "seed": run_seed},
        )
    )
    t0 = time.perf_counter()
    with quiet_transformers():  # checkpoint saves inside train() draw bars too
        run = build_run(config)
        final = train(config, run=run, extra_eval=CurveProbe(curve_rows, max_new, run_seed))
    train_seconds = time.perf_counter() - t0
    curve = [
        {
            "step": r["step"],
            "sampled_accuracy": r["eval_sampled_accuracy"],
            "teacher_tokens": r.get("total_teacher_tokens_scored", 0)
            + r.get("total_teacher_tokens_generated", 0),
            "wall_seconds": r["eval_wall_seconds"],
        }
        for r in read_metrics(run_dir)
        if "eval_sampled_accuracy" in r
    ]
    record = {"totals": final["totals"], "train_seconds": train_seconds, "curve": curve}
    return {"student": run.student, "record": record}


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = _merge(out[key], value)
            else:
                out[key] = value
    return out
