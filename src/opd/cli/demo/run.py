"""`opd demo`: offline KD vs on-policy distillation, as a test of the exposure-bias claim.

    opd demo --quick              # about 2 minutes on 2 CPU cores, cold
    opd demo                      # the full comparison, under 10 minutes cold

Phases (each with its progress bar): build (or reuse) a tokenizer, a teacher that corrects
slips and a weak student (`opd.cli.demo.build`); write the offline data once with
`opd generate` (the teacher's completions and top-k log-probs, `opd.teachers.cache`); measure
teacher and student before distillation; distil the same starting student with each
method through `opd.train` for the same number of updates; measure every result
(`opd.cli.demo.probes`); write `report.md`, `results.json` and plots to the output dir.
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
from opd.cli.demo.quiet import quiet_transformers
from opd.cli.demo.report import write_outputs
from opd.cli.demo.task import TaskSpec, make_examples, max_completion_chars
from opd.config.parse import DataConfig, config_from_dict
from opd.data.cache_format import read_manifest
from opd.data.rows import Encoder
from opd.evaluation.divergence import divergence_by_position, teacher_logits
from opd.evaluation.generation import sample_completions
from opd.modeling.hf import load_causal_lm, load_tokenizer
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.setup import build_run
from opd.teachers.cache.generate import CacheSpec, build_cache
from opd.teachers.local import LocalTeacher

EXPOSURE_KINDS = ("tvd", "reverse_kl", "forward_kl")

# Each method is a preset plus what makes it the method named. The three offline ones
# read the same stored teacher data (written once); the two on-policy ones sample the
# student and call the live teacher. `offline_rkl` is the control that tells the two
# mechanisms apart: the mode-seeking divergence of `on_policy_rkl` on teacher prefixes.
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
        )


class CurveProbe:
    """During training: sampled answer accuracy on a fixed mixed-length set."""

    def __init__(self, rows: list[dict], max_new_tokens: int, seed: int):
        self.rows, self.max_new_tokens, self.seed = rows, max_new_tokens, seed

    def __call__(self, run) -> dict:
        _, _, texts = probes.generate(
            run.student,
            run.encoder,
            self.rows,
            samples=1,
            temperature=1.0,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
        )
        hits = probes.score_texts(texts, self.rows, 1)["answer"]
        return {"eval_sampled_accuracy": sum(hits) / len(hits)}


def measure(model, encoder, teacher, eval_sets, settings, seed, max_new_tokens, teacher_ref=None):
    """All final figures of one model (`teacher`: a LocalTeacher for the exposure gap)."""
    tok = encoder.tokenizer
    out: dict = {"by_length": {}}
    all_rows = [r for rows in eval_sets.values() for r in rows]
    for n, rows in eval_sets.items():
        kw = {"seed": seed + n, "max_new_tokens": max_new_tokens}
        p, c, texts = probes.generate(
            model, encoder, rows, samples=settings.samples, temperature=1.0, **kw
        )
        sampled = probes.score_texts(texts, rows, settings.samples)
        _, _, greedy_texts = probes.generate(model, encoder, rows, samples=1, temperature=0.0, **kw)
        greedy = probes.score_texts(greedy_texts, rows, 1)
        repeated = [r for r in rows for _ in range(settings.samples)]
        out["by_length"][n] = {
            "sampled_accuracy": probes.summarize(sampled["answer"], seed),
            "sampled_all_steps": probes.summarize(sampled["all_steps"], seed),
            "greedy_accuracy": probes.summarize(greedy["answer"], seed),
            "own_slips": probes.slip_chain(texts, repeated),
            "per_problem": sampled["answer"],
        }
        if n == max(eval_sets):
            own = (p, c)
    forced = probes.forced_slips(model, tok, all_rows, seed)
    out["forced"] = {k: probes.summarize(v, seed) for k, v in forced.items()}
    lengths = [len(r["values"]) for r in all_rows]
    out["forced_by_length"] = {
        n: {
            k: float(sum(v for v, m in zip(vals, lengths) if m == n) / lengths.count(n))
            for k, vals in forced.items()
        }
        for n in eval_sets
    }
    for temp in (1.0, 0.0):
        key = "from_corrupted_sampled" if temp else "from_corrupted_greedy"
        scores = probes.from_corrupted_prefix(
            model, encoder, all_rows, seed=seed, temperature=temp, max_new_tokens=max_new_tokens
        )
        out[key] = probes.summarize(scores, seed)
    if teacher is not None and teacher_ref is not None:
        out["exposure"] = exposure_by_step(model, teacher, own, teacher_ref, tok.pad_token_id)
    return out


def exposure_by_step(model, teacher, own, teacher_ref, pad_id) -> dict:
    """Mean divergence per step (summed over the step's two tokens) on the model's own
    samples and on the teacher's, and the gap, for the longest problems."""
    vocab = model.config.vocab_size
    common = {"pad_id": pad_id, "vocab_size": vocab, "kinds": EXPOSURE_KINDS, "batch_size": 512}
    on_own = divergence_by_position(model, teacher, *own, **common)
    on_teacher = divergence_by_position(
        model, teacher, *teacher_ref["samples"], **common, precomputed=teacher_ref["logits"]
    )
    out = {}
    for kind in EXPOSURE_KINDS:
        steps = min(len(on_own[kind]), len(on_teacher[kind])) // 2
        own_s = [on_own[kind][2 * j] + on_own[kind][2 * j + 1] for j in range(steps)]
        ref_s = [on_teacher[kind][2 * j] + on_teacher[kind][2 * j + 1] for j in range(steps)]
        out[kind] = {
            "on_own": own_s,
            "on_teacher": ref_s,
            "gap": [a - b for a, b in zip(own_s, ref_s, strict=True)],
        }
    return out


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
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "opd" / "demo"
    settings = settings or DemoSettings.preset(quick)
    log(
        f"[opd demo] phase 1/5: teacher and student (cache {cache_dir}, quick={quick}, seed={seed})"
    )
    t0 = time.perf_counter()
    models = build_models(cache_dir, quick=quick, seed=seed)
    build_seconds = time.perf_counter() - t0
    task_spec = models["meta"]["config"]["task"]
    max_new = max_completion_chars(TaskSpec(**task_spec)) + 1
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    tokenizer = load_tokenizer(str(models["tokenizer_dir"]))
    vocab = len(tokenizer)
    log("[opd demo] phase 2/5: offline data, written once by the teacher (opd generate)")
    offline = write_offline_data(
        models, data_dir, settings, TaskSpec(**task_spec), seed, max_new, vocab
    )

    spec = TaskSpec(**task_spec)
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
        "seed": seed,
    }
    results: dict = {
        "settings": asdict(settings),
        "seed": seed,
        "quick": quick,
        "task": task_spec,
        "build": {"seconds": build_seconds, **models["meta"]},
        "offline_data": offline,
        "methods": {},
    }

    log("[opd demo] phase 3/5: teacher and student before distillation")
    with quiet_transformers():
        teacher_model = load_causal_lm(str(models["teacher_dir"]))
        student0 = load_causal_lm(str(models["student_dir"]))
    teacher = LocalTeacher(teacher_model, vocab)
    encoder = Encoder(tokenizer, DataConfig())  # what every run's encoder is here
    longest = eval_sets[max(eval_sets)]
    ref_samples = sample_completions(
        teacher_model,
        encoder,
        [r for r in longest for _ in range(settings.samples)],
        prompt_field="prompt",
        max_new_tokens=max_new,
        vocab_size=vocab,
        temperature=1.0,
        seed=seed + 7,
        batch_size=512,
    )
    teacher_ref = {
        "samples": ref_samples,
        "logits": teacher_logits(
            teacher, *ref_samples, pad_id=tokenizer.pad_token_id, batch_size=512
        ),
    }
    bar = tqdm(total=2, desc="measure before", disable=None, dynamic_ncols=True)
    results["references"] = {}
    for name, model in (("teacher", teacher_model), ("student_before", student0)):
        ref = teacher_ref if name == "student_before" else None
        results["references"][name] = measure(
            model, encoder, teacher, eval_sets, settings, seed, max_new, ref
        )
        bar.update(1)
    bar.close()

    names = methods or list(METHODS)
    log(f"[opd demo] phase 4/5: distil with {len(names)} methods, {settings.steps} updates each")
    for i, name in enumerate(names, 1):
        run_dir = out / "runs" / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        data = offline["cache"] if name in OFFLINE else offline["prompts"]
        config = config_from_dict(
            _merge(common, METHODS[name], {"data": {"train": data}, "output_dir": str(run_dir)})
        )
        log(f"[opd demo] method {i}/{len(names)}: {name}")
        t_method = time.perf_counter()
        with quiet_transformers():  # checkpoint saves inside train() draw bars too
            run = build_run(config)
            final = train(config, run=run, extra_eval=CurveProbe(curve_rows, max_new, seed))
        train_seconds = time.perf_counter() - t_method
        result = measure(
            run.student, run.encoder, teacher, eval_sets, settings, seed, max_new, teacher_ref
        )
        curve = [r for r in read_metrics(run_dir) if "eval_sampled_accuracy" in r]
        result.update(
            config=METHODS[name],
            offline=name in OFFLINE,
            student_updates=settings.steps,
            totals=final["totals"],
            train_seconds=train_seconds,
            measure_seconds=time.perf_counter() - t_method - train_seconds,
            curve=[
                {
                    "step": r["step"],
                    "sampled_accuracy": r["eval_sampled_accuracy"],
                    "teacher_tokens": r.get("total_teacher_tokens_scored", 0)
                    + r.get("total_teacher_tokens_generated", 0),
                }
                for r in curve
            ],
        )
        results["methods"][name] = result
        top = result["by_length"][max(eval_sets)]["sampled_accuracy"]
        log(
            f"[opd demo] {name}: sampled accuracy at {max(eval_sets)} steps {top['mean']:.3f} "
            f"[{top['ci95'][0]:.3f}, {top['ci95'][1]:.3f}] ({train_seconds:.0f}s training)"
        )
    log("[opd demo] phase 5/5: report")
    results["total_seconds"] = time.perf_counter() - t_start
    write_outputs(out, results)
    log(
        f"[opd demo] wrote {out / 'report.md'}, {out / 'results.json'} and plots "
        f"in {results['total_seconds']:.0f}s"
    )
    return results


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = _merge(out[key], value)
            else:
                out[key] = value
    return out
