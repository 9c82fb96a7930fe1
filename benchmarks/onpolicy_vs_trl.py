"""On-policy distillation step throughput: opd against TRL's DistillationTrainer (issue 10).

    python benchmarks/onpolicy_vs_trl.py                     # tiny: V=50, teacher 256x4, student 128x2
    python benchmarks/onpolicy_vs_trl.py --size large        # V=32,000, teacher 512x8, student 256x4
    python benchmarks/onpolicy_vs_trl.py --size qwen3 --device cuda   # Qwen3-1.7B -> 0.6B shapes, bf16
    python benchmarks/onpolicy_vs_trl.py --rounds 1 --steps 2 --warmup 1   # smoke test

Both sides train the same random-initialised student against the same teacher on the same
prompts: batch 32, up to 48 new tokens sampled by the student at temperature 1 (no top-k,
no top-p), full-vocabulary reverse KL(student || teacher) per completion token, summed and
divided by the batch's completion-token count, AdamW, one optimizer step per batch.

  ours  `opd.train` with preset `minillm_like` (student samples + full vocabulary + reverse KL)
  trl   `trl.DistillationTrainer` (TRL 1.16, always on-policy) with `beta=1`, which is
        KL(student || teacher) in its convention (beta is the teacher's weight in the
        mixture m = (1 - beta) p_s + beta p_t, so beta = 1 makes m = p_t). TRL's defaults
        `gradient_checkpointing=True` and `bf16=True` are turned off on CPU (both make it
        slower there); on CUDA both sides hold bf16 weights.

Before timing, `check` computes both losses on one batch (same weights, same sampled
sequences; prompts have equal length so that TRL, which passes no position ids, sees the
same positions as opd) and prints them: they must agree.

Each side then runs in a fresh subprocess (so neither inherits the other's memory or
caches), `--warmup` steps then `--steps` timed steps; the sides alternate, `--rounds`
times, and the medians are reported. A step is timed from the end of the previous step
to the end of this one (everything the training loop does: sampling, teacher forward,
student forward/backward, optimizer). Throughput is student tokens generated (completion
tokens up to and including EOS) per second of training. Peak memory is the worker
process's RSS high-water mark (VmHWM, which includes the Python imports: TRL pulls in more
of transformers), and on CUDA `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from onpolicy_models import BATCH, MAX_NEW, SIZES, build, opd_config, status_kb

# ---------------------------------------------------------------- the two sides


def run_ours(args, paths: dict, out: Path) -> dict:
    import opd.run.loop

    config = opd_config(
        paths,
        out,
        steps=args.warmup + args.steps,
        dtype=args.dtype,
        teacher_dtype=args.teacher_dtype,
        device=args.device,
        seed=args.seed,
        engine=args.engine,
    )
    ends, cpu, tokens = [], [], []
    inner = opd.run.loop.train_step

    def timed_step(run, step, timer):
        record = inner(run, step, timer)
        _sync(args.device)
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
        tokens.append(record["student_tokens_generated"])
        return record

    opd.run.loop.train_step = timed_step
    opd.run.loop._save = lambda *a, **k: None  # TRL side saves nothing either
    _reset_peaks(args.device)
    rss_before = status_kb("VmRSS")
    _sync(args.device)
    ends.append(time.perf_counter())
    cpu.append(time.process_time())
    opd.run.loop.train(config)
    return _summary(args, ends, cpu, tokens, rss_before)


def run_trl(args, paths: dict, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(paths["student"], padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=dtype)
    teacher_dtype = getattr(torch, args.teacher_dtype)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=teacher_dtype)
    rows = [json.loads(line) for line in paths["prompts"].read_text().splitlines()]
    ends, cpu, tokens = [], [], []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            _sync(args.device)
            ends.append(time.perf_counter())
            cpu.append(time.process_time())

    cfg = DistillationConfig(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        max_completion_length=MAX_NEW,
        temperature=1.0,
        beta=1.0,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        # --trl-defaults keeps TRL's own defaults (bf16 autocast, gradient checkpointing), as a
        # user who does not tune it runs it; otherwise both are set as fast as they go here.
        bf16=args.trl_defaults or (args.device == "cuda" and args.dtype == "bfloat16"),
        gradient_checkpointing=args.trl_defaults,
        use_cpu=args.device == "cpu",
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=cfg,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[Clock()],
    )
    generate = trainer._generate_single_turn

    def counted(*a, **k):
        ids = generate(*a, **k)
        tokens.append(sum(len(c) for c in ids))
        return ids

    trainer._generate_single_turn = counted
    _reset_peaks(args.device)
    rss_before = status_kb("VmRSS")
    _sync(args.device)
    ends.append(time.perf_counter())
    cpu.append(time.process_time())
    trainer.train()
    return _summary(args, ends, cpu, tokens, rss_before)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _reset_peaks(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _summary(args, ends, cpu, tokens, rss_before_kb: int) -> dict:
    steps = [b - a for a, b in itertools.pairwise(ends)]
    cpu_steps = [b - a for a, b in itertools.pairwise(cpu)]
    timed, timed_tokens = steps[args.warmup :], tokens[args.warmup :]
    timed_cpu = cpu_steps[args.warmup :]
    out = {
        "step_s": timed,
        "cpu_s": timed_cpu,
        "tokens": timed_tokens,
        "tokens_per_s": sum(timed_tokens) / sum(timed),
        "steps_per_s": len(timed) / sum(timed),
        # Process CPU time: what a step costs when the machine is shared (our share of the
        # cores shrinks the wall-clock figures, not this one, for single-threaded runs).
        "tokens_per_cpu_s": sum(timed_tokens) / sum(timed_cpu),
        "rss_before_mb": rss_before_kb / 1024,
        "peak_rss_mb": status_kb("VmHWM") / 1024,
    }
    if args.device == "cuda":
        import torch

        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ---------------------------------------------------------------- loss agreement


def check(args, paths: dict, out: Path) -> dict:
    """Both losses, and their gradients, on one batch: same weights, same sampled sequences.

    opd's loss is computed the way its loop computes it (the fused head + divergence, on the
    forward `--engine` names: by default the packed lean one) and, for reference, on full
    logits (`objectives.plain.batch_loss`); TRL's by its own `DistillationTrainer._compute_loss` on that batch.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    from opd.data.batch import assemble
    from opd.modeling.hf import completion_logits
    from opd.objectives.fused import fused_batch_loss, teacher_hidden
    from opd.objectives.plain import batch_loss
    from opd.run.setup import build_run
    from opd.sampling.fast import sample_fast
    from opd.sampling.reference import sample

    config = opd_config(
        paths,
        out / "ours",
        steps=1,
        dtype=args.dtype,
        teacher_dtype=args.teacher_dtype,
        device=args.device,
        engine=args.engine,
    )
    run = build_run(config)
    student = run.student
    prompts = [run.encoder.prompt_ids(r["prompt"]) for r in run.train_rows]
    sampling = {
        "max_new_tokens": MAX_NEW,
        "eos_id": run.tokenizer.eos_token_id,
        "pad_id": run.tokenizer.pad_token_id,
        "vocab_size": run.vocab_size,
    }
    rollout = sample(
        student,
        prompts,
        **sampling,
        generator=torch.Generator(device=run.device).manual_seed(args.seed),
    )
    # The loop samples with the fast path; from the same generator state it must give the
    # same tokens as `sample` (always on CPU in float32; bf16 rounding may flip a few).
    fast = sample_fast(
        student,
        prompts,
        **sampling,
        generator=torch.Generator(device=run.device).manual_seed(args.seed),
    )
    same_rows = sum(a == b for a, b in zip(rollout.completions, fast.completions, strict=True))
    batch = assemble(
        prompts, rollout.completions, pad_id=run.tokenizer.pad_token_id, source="student"
    )
    batch = batch.to(run.device)
    n = batch.num_target_tokens()
    params = [p for p in student.parameters() if p.requires_grad]

    def loss_and_grads(fn):
        student.zero_grad(set_to_none=True)
        loss = fn()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).float().flatten()
                          for g, p in zip(grads, params, strict=True)])  # fmt: skip
        return float(loss), flat

    student.train()
    fused, g_fused = loss_and_grads(
        lambda: fused_batch_loss(
            student,
            run.teacher,
            teacher_hidden(run.teacher, batch, config.loss.fused_forward),
            batch,
            config.loss,
            n,
            run.vocab_size,
        )[0]
    )
    scores = run.teacher.score(batch, "logits", 0)
    plain, _ = loss_and_grads(
        lambda: batch_loss(
            completion_logits(student, batch, run.vocab_size), batch, scores, config.loss, n
        )[0]
    )
    tok = AutoTokenizer.from_pretrained(paths["student"], padding_side="left")
    trainer = DistillationTrainer(
        model=student,
        teacher_model=run.teacher.model,
        args=DistillationConfig(
            output_dir=str(out / "trl"),
            beta=1.0,
            bf16=args.device == "cuda" and args.dtype == "bfloat16",
            gradient_checkpointing=False,
            use_cpu=args.device == "cpu",
            report_to="none",
        ),
        train_dataset=Dataset.from_list(run.train_rows),
        processing_class=tok,
    )
    # TRL's own tokenization of the prompts must give the ids opd sampled from.
    trl_prompt_ids, _, _ = trainer._tokenize_prompts([r["prompt"] for r in run.train_rows])
    assert trl_prompt_ids == prompts, "TRL tokenizes the prompts differently"
    P = batch.prompt_width
    inputs = {
        "prompt_ids": batch.input_ids[:, :P],
        "prompt_mask": batch.attention_mask[:, :P],
        "completion_ids": batch.input_ids[:, P:],
        "completion_mask": batch.completion_mask[:, P:],
    }
    student.train()
    trl_loss, g_trl = loss_and_grads(
        lambda: trainer._compute_loss(student, inputs, torch.tensor(n, device=run.device))[0]
    )
    return {
        "sampler_rows_identical": same_rows / len(prompts),
        "completion_tokens": n,
        "loss_opd": fused,
        "loss_opd_full_logits": plain,
        "loss_trl": trl_loss,
        "loss_rel_diff": abs(fused - trl_loss) / abs(trl_loss),
        "grad_norm_opd": float(g_fused.norm()),
        "grad_norm_trl": float(g_trl.norm()),
        "grad_rel_diff": float((g_fused - g_trl).norm() / g_trl.norm()),
    }


# ---------------------------------------------------------------- driver


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    paths = {k: Path(v) for k, v in json.loads(args.paths).items()}
    with tempfile.TemporaryDirectory() as tmp:
        fn = {"ours": run_ours, "trl": run_trl, "check": check}[args.worker]
        return fn(args, paths, Path(tmp))


def spawn(side: str, args, paths: dict) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        side,
        "--paths",
        json.dumps({k: str(v) for k, v in paths.items()}),
    ]
    for key in ("size", "device", "dtype", "teacher_dtype", "steps", "warmup", "threads", "seed"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.trl_defaults:
        cmd.append("--trl-defaults")
    cmd += ["--engine", args.engine]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"{side} worker failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(name: str, s: dict) -> str:
    cuda = f"{s['cuda_peak_mb']:15.0f}" if "cuda_peak_mb" in s else ""
    return (
        f"{name:6}{s['tokens_per_s']:10.1f}{s['steps_per_s']:10.3f}{s['tokens_per_cpu_s']:12.1f}"
        f"{s['peak_rss_mb']:13.0f}{cuda}"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default=None, help="model weights (default: bfloat16 on cuda, else float32)"
    )
    p.add_argument(
        "--teacher-dtype",
        default=None,
        help="the teacher's weights on both sides (default: as --dtype); bfloat16 on a CPU with "
        "avx512_bf16 runs its matmuls several times faster",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default per size)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 2; 1 on large)"
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each side")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="ours,trl", help="which sides to time (ours,trl)")
    p.add_argument("--workdir", default=None, help="where models are built (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--no-check", action="store_true", help="skip the loss/gradient agreement check")
    p.add_argument(
        "--trl-defaults",
        action="store_true",
        help="run TRL with its default bf16=True, gradient_checkpointing=True",
    )
    p.add_argument(
        "--engine",
        default="auto",
        choices=("auto", "hf", "lean"),
        help="opd's sampling.engine and loss.fused_forward: auto (its default) | hf (the "
        "Hugging Face forward throughout) | lean",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or SIZES[args.size]["steps"]
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.teacher_dtype = args.teacher_dtype or args.dtype
    if args.warmup is None:
        args.warmup = 1 if args.size != "tiny" else 2
    if args.worker:
        print(json.dumps(worker(args)))
        return
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory()
        args.workdir = tmp.name
    paths = build(Path(args.workdir) / args.size, args.size, args.dtype, args.device)
    sides = [s for s in ("ours", "trl") if s in args.sides.split(",")]
    results = {k: v for k, v in vars(args).items() if k not in ("worker", "paths")}
    if not args.no_check:
        results["check"] = c = spawn("check", args, paths)
        print(
            f"one batch, {c['completion_tokens']} completion tokens: loss opd {c['loss_opd']:.6f} "
            f"(full logits {c['loss_opd_full_logits']:.6f}), TRL {c['loss_trl']:.6f}, relative "
            f"difference {c['loss_rel_diff']:.1e}; gradient norm opd {c['grad_norm_opd']:.6f}, "
            f"TRL {c['grad_norm_trl']:.6f}, relative difference {c['grad_rel_diff']:.1e}; "
            f"fast sampler rows identical to `sample`: {c['sampler_rows_identical']:.0%}",
            flush=True,
        )
    runs = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            res = spawn(side, args, paths)
            runs[side].append(res)
            print(
                f"round {r + 1} {side:>4}: {res['tokens_per_s']:8.1f} tok/s  "
                f"{res['steps_per_s']:6.3f} steps/s  {res['tokens_per_cpu_s']:8.1f} tok/CPU-s  "
                f"peak RSS {res['peak_rss_mb']:6.0f} MB"
                + (f"  CUDA peak {res['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in res else ""),
                flush=True,
            )
    keys = (
        "tokens_per_s",
        "steps_per_s",
        "tokens_per_cpu_s",
        "peak_rss_mb",
        "rss_before_mb",
        "cuda_peak_mb",
    )
    summary = {
        side: {k: statistics.median(r[k] for r in rs) for k in keys if k in rs[0]}
        for side, rs in runs.items()
    }
    results.update(runs=runs, summary=summary)
    print(
        f"\n{args.size} on {args.device} ({args.dtype}, {args.threads} threads, opd engine "
        f"{args.engine}), batch {BATCH}, "
        f"{MAX_NEW} new tokens, {args.steps} timed steps, medians of {args.rounds} runs per side:"
    )
    cuda = "  CUDA peak MB" if args.device == "cuda" else ""
    print(f"{'':6}{'tok/s':>10}{'steps/s':>10}{'tok/CPU-s':>12}{'peak RSS MB':>13}{cuda}")
    for side in sides:
        print(_row(side, summary[side]))
    if len(sides) == 2:
        for key, label in (("tokens_per_s", "wall"), ("tokens_per_cpu_s", "CPU-time")):
            ratios = [o[key] / t[key] for o, t in zip(runs["ours"], runs["trl"], strict=True)]
            results[f"ratio_{label}"] = statistics.median(ratios)
            results[f"ratio_{label}_per_round"] = ratios
            print(
                f"throughput opd / TRL ({label}): {statistics.median(ratios):.2f}x "
                f"(per round: {', '.join(f'{x:.2f}' for x in ratios)})"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
